"""The GPU input path's batched ops and random choices against Pillow and timm's CPU transform.

Each check takes a device: here it runs on CPU tensors, tests/gpu/test_gpu_input_cuda.py runs the same on CUDA.
"""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from timm.data import create_transform
from torchvision import transforms
from torchvision.datasets import ImageFolder

import main
from trainer import UserError, gpu_input
from trainer.gpu_input import OP_KINDS, TrainAugmentation
from trainer.image_files import BadImageCount
from trainer.samplers import ResumableSampler, SeededDataset

pytestmark = pytest.mark.usefixtures('one_thread')

RECIPE = dict(input_size=224, is_training=True, color_jitter=0.3, auto_augment='rand-m9-mstd0.5-inc1',
              interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1)
FILL = (124, 116, 104)  # the ImageNet mean in 8 bits, the recipe's fill of moved-in pixels


def photo(width=64, height=48, seed=0):
    """A photo-like RGB image: smooth colour gradients, a few hard-edged shapes and mild noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64)
    for _ in range(3):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        base[y0:y0 + rng.integers(4, 16), x0:x0 + rng.integers(4, 16)] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def as_batch(images, device):
    return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1) for i in images]).to(device)


def as_array(batch):
    return batch.permute(0, 2, 3, 1).cpu().numpy()


# (op, argument, Pillow reference) for the colour ops: Pillow computes these in 8-bit integer steps, so the
# batched op must agree to within one level
PIXEL_CASES = [
    ('autocontrast', 0, ImageOps.autocontrast),
    ('equalize', 0, ImageOps.equalize),
    ('invert', 0, ImageOps.invert),
    ('posterize', 1, lambda im: ImageOps.posterize(im, 1)),
    ('posterize', 3, lambda im: ImageOps.posterize(im, 3)),
    ('solarize', 200, lambda im: ImageOps.solarize(im, 200)),
    ('solarize', 26, lambda im: ImageOps.solarize(im, 26)),
    ('solarize_add', 99, lambda im: im.point([min(255, i + 99) if i < 128 else i for i in range(256)] * 3)),
    ('color', 0.19, lambda im: ImageEnhance.Color(im).enhance(0.19)),
    ('color', 1.81, lambda im: ImageEnhance.Color(im).enhance(1.81)),
    ('contrast', 0.3, lambda im: ImageEnhance.Contrast(im).enhance(0.3)),
    ('contrast', 1.9, lambda im: ImageEnhance.Contrast(im).enhance(1.9)),
    ('brightness', 0.25, lambda im: ImageEnhance.Brightness(im).enhance(0.25)),
    ('brightness', 1.7, lambda im: ImageEnhance.Brightness(im).enhance(1.7)),
    ('sharpness', 0.1, lambda im: ImageEnhance.Sharpness(im).enhance(0.1)),
    ('sharpness', 1.9, lambda im: ImageEnhance.Sharpness(im).enhance(1.9)),
]


def check_pixel_ops(device):
    images = [photo(seed=s) for s in range(3)]
    for kind, arg, reference in PIXEL_CASES:
        got = as_array(gpu_input.pixel_op(kind, as_batch(images, device), torch.full((3,), float(arg), device=device)))
        want = np.stack([np.asarray(reference(im), dtype=np.float32) for im in images])
        assert np.abs(got - want).max() <= 1, (kind, arg, np.abs(got - want).max())
        assert np.abs(got - want).mean() < 0.05, (kind, arg)


# (op, argument, Pillow reference) for the ops that move pixels, with the recipe's fill
GEOMETRIC_CASES = [
    ('rotate', 27.0, lambda im, f: im.rotate(27.0, resample=f, fillcolor=FILL)),
    ('rotate', -13.5, lambda im, f: im.rotate(-13.5, resample=f, fillcolor=FILL)),
    ('shear_x', 0.27, lambda im, f: im.transform(im.size, Image.AFFINE, (1, 0.27, 0, 0, 1, 0), f, fillcolor=FILL)),
    ('shear_y', -0.3, lambda im, f: im.transform(im.size, Image.AFFINE, (1, 0, 0, -0.3, 1, 0), f, fillcolor=FILL)),
    ('translate_x_rel', 0.4, lambda im, f: im.transform(im.size, Image.AFFINE, (1, 0, 0.4 * im.size[0], 0, 1, 0), f,
                                                         fillcolor=FILL)),
    ('translate_y_rel', -0.405, lambda im, f: im.transform(im.size, Image.AFFINE,
                                                            (1, 0, 0, 0, 1, -0.405 * im.size[1]), f, fillcolor=FILL)),
]


def check_geometric_ops(device):
    image = photo()
    for kind, arg, reference in GEOMETRIC_CASES:
        for mode, pil_filter in (('bilinear', Image.BILINEAR), ('bicubic', Image.BICUBIC)):
            matrices = gpu_input.affine_matrices(kind, torch.tensor([arg], dtype=torch.float64, device=device), 48, 64)
            got = as_array(gpu_input.warp(as_batch([image], device), matrices, mode, FILL))[0]
            want = np.asarray(reference(image, pil_filter), dtype=np.float32)
            diff = np.abs(got - want)
            # the fill covers the same pixels; inside, the filters differ only in their cubic's sharpness
            # (Pillow a = -0.5, torch a = -0.75) and in rounding
            assert (got == FILL).all(-1).sum() == pytest.approx((want == FILL).all(-1).sum(), abs=64 // 8), (kind, mode)
            assert diff.mean() < (1.0 if mode == 'bilinear' else 2.5), (kind, mode, diff.mean())
            assert np.percentile(diff, 95) <= (3 if mode == 'bilinear' else 8), (kind, mode)


def check_resized_crop(device):
    image = photo(200, 150)
    for box, mode, pil_filter in (((10, 20, 120, 100), 'bicubic', Image.BICUBIC),
                                  ((0, 0, 150, 200), 'bilinear', Image.BILINEAR),
                                  ((30, 40, 20, 30), 'bicubic', Image.BICUBIC)):  # an upscale
        top, left, height, width = box
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(device)
        got = as_array(gpu_input.resized_crops([chw], torch.tensor([box]), torch.tensor([gpu_input.INTERPOLATIONS.index(
            mode)]), (56, 56)))[0]
        want = np.asarray(image.resize((56, 56), pil_filter, box=(left, top, left + width, top + height)),
                          dtype=np.float32)
        assert np.abs(got - want).mean() < 0.6 and np.abs(got - want).max() <= 8, (box, mode)


def check_recipe_matches_cpu_transform(device):
    """Under one seed, both paths draw the same choices: the GPU path's batch is the CPU transform's image."""
    transform = create_transform(**{**RECIPE, 're_prob': 0.0})
    cpu_steps = transforms.Compose(transform.transforms[:3])  # crop, flip, RandAugment (8-bit images)
    augmentation = TrainAugmentation(transform)
    images = [photo(320, 240, seed=s) for s in range(24)]
    wants, choices = [], []
    for seed, image in enumerate(images):
        main.seed_everything(seed)
        wants.append(np.asarray(cpu_steps(image), dtype=np.float32))
        main.seed_everything(seed)
        choices.append(augmentation.draw(image))
    _, stacked, _, _ = gpu_input.EncodedImageDataset.collate([(None, c, 0, '') for c in choices])
    chw = [torch.from_numpy(np.array(i)).permute(2, 0, 1).to(device) for i in images]
    normalised = gpu_input.augment_batch(chw, stacked, augmentation)
    mean = torch.tensor(augmentation.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(augmentation.std, device=device).view(1, 3, 1, 1)
    got = as_array((normalised * std + mean) * 255)
    diffs = np.abs(got - np.stack(wants)).mean((1, 2, 3))
    assert (stacked['ops'] != gpu_input.NO_OP).any(1).sum() >= 12  # the seeds exercise RandAugment
    assert np.median(diffs) < 1.0 and diffs.max() < 4.0, diffs


def check_erasing(device):
    x = torch.zeros(3, 3, 10, 12, device=device)
    boxes = torch.tensor([[[2, 3, 4, 5]], [[0, 0, 0, 0]], [[9, 11, 1, 1]]])
    out = gpu_input.erase(x, boxes, torch.Generator(device).manual_seed(0)).cpu()
    expected = torch.zeros(3, 1, 10, 12, dtype=torch.bool)
    expected[0, :, 2:6, 3:8] = True
    expected[2, :, 9, 11] = True
    assert ((out != 0) == expected.expand_as(out)).all()
    assert 0.5 < out[0, :, 2:6, 3:8].std() < 1.5


def write_folder(root, classes=2, per_class=12, size=(96, 72)):
    """JPEGs (one greyscale, one CMYK) and a PNG per class, as an image folder."""
    for c in range(classes):
        folder = root / 'train' / f'class{c}'
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = photo(*size, seed=100 * c + i)
            if i == 0:
                image.save(folder / f'{i}.png')
            else:
                image = image.convert('L') if i == 1 else image.convert('CMYK') if i == 2 else image
                image.save(folder / f'{i}.jpg', quality=90)
        (root / 'val' / f'class{c}').mkdir(parents=True)
        photo(*size, seed=c).save(root / 'val' / f'class{c}' / '0.jpg')
    return root


def batches(device, tmp_path, epochs, stop_after, workers=2):
    root = write_folder(tmp_path)
    folder = ImageFolder(str(root / 'train'), transform=create_transform(**{**RECIPE, 'input_size': 64}))
    dataset = gpu_input.encoded_dataset(folder, 'folder')
    sampler = ResumableSampler(len(dataset), seed=3)
    loader = torch.utils.data.DataLoader(SeededDataset(dataset), sampler=sampler, batch_size=8, num_workers=workers,
                                         collate_fn=dataset.collate, persistent_workers=True, drop_last=True)
    gpu_loader = gpu_input.GpuTrainLoader(loader, dataset.augmentation, device)
    out = []
    for _ in range(epochs):
        sampler.set_epoch(0)  # the same samples and seeds each pass
        for step, (samples, targets) in enumerate(gpu_loader):
            out.append((samples.clone(), targets.clone()))
            if step + 1 == stop_after:
                break
    return out


def check_prefetching_loader(device, tmp_path):
    """Same samples and seeds give the same batches, also after stopping a pass early; a loader error surfaces."""
    passes = batches(device, tmp_path, epochs=3, stop_after=2)
    assert len(passes) == 6
    for (a, ta), (b, tb) in zip(passes[:2], passes[2:4]):
        assert a.shape == (8, 3, 64, 64) and a.device.type == torch.device(device).type and a.dtype == torch.float32
        assert torch.equal(a, b) and torch.equal(ta, tb)
    everything = torch.cat([s for s, _ in passes])
    assert torch.isfinite(everything).all() and abs(everything.mean().item()) < 1.0
    broken = gpu_input.GpuTrainLoader(torch.utils.data.DataLoader(range(4), collate_fn=failing_collate), None, device)
    with pytest.raises(RuntimeError, match='cannot collate'):
        list(broken)


def failing_collate(items):
    raise RuntimeError('cannot collate')


@pytest.mark.parametrize('check', [check_pixel_ops, check_geometric_ops, check_resized_crop,
                                   check_recipe_matches_cpu_transform, check_erasing])
def test_batched_ops_on_cpu(check):
    check('cpu')


def test_prefetching_loader_on_cpu(tmp_path):
    check_prefetching_loader('cpu', tmp_path)


def test_posterize_to_zero_bits_is_black_and_eight_bits_unchanged():
    x = torch.tensor([0.0, 1, 127, 128, 255]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = gpu_input.pixel_op('posterize', x, torch.tensor([0.0, 8.0]))
    assert out[0].eq(0).all() and out[1].eq(x[1]).all()


def draws(count, seed=0, size=(500, 375)):
    augmentation = TrainAugmentation(create_transform(**RECIPE))
    image = Image.new('RGB', size)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return [augmentation.draw(image) for _ in range(count)]


def ks_distance(a, b):
    grid = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), grid, 'right') / len(a)
                  - np.searchsorted(np.sort(b), grid, 'right') / len(b)).max()


def test_crop_scale_and_ratio_follow_the_random_resized_crop_law():
    w, h = 500, 375
    crops = np.array([d['crop'].tolist() for d in draws(4000)], dtype=np.float64)
    area, log_ratio = crops[:, 2] * crops[:, 3] / (w * h), np.log(crops[:, 3] / crops[:, 2])
    # independent reference: rejection sampling of (area ~ U(0.08, 1), log ratio ~ U(log 3/4, log 4/3)) until
    # the box fits, vectorised (the rare all-10-attempts-fail fallback is a centre crop, too rare to matter here)
    rng = np.random.default_rng(1)
    a, r = rng.uniform(0.08, 1, 40000) * w * h, np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), 40000))
    bw, bh = np.round(np.sqrt(a * r)), np.round(np.sqrt(a / r))
    fits = (bw <= w) & (bh <= h)
    ref_area, ref_log_ratio = bw[fits] * bh[fits] / (w * h), np.log(bw[fits] / bh[fits])
    assert ks_distance(area, ref_area) < 0.03 and ks_distance(log_ratio, ref_log_ratio) < 0.03
    assert (crops[:, 0] + crops[:, 2] <= h).all() and (crops[:, 1] + crops[:, 3] <= w).all()


def test_randaugment_choices_and_magnitudes_follow_the_policy():
    d = draws(6000)
    ops = torch.stack([x['ops'] for x in d]).numpy()
    args = torch.stack([x['op_args'] for x in d]).numpy()
    # 2 layers; each picks one of 15 ops uniformly and applies it with probability 1/2
    assert ops.shape == (6000, 2)
    assert abs((ops == gpu_input.NO_OP).mean() - 0.5) < 0.02
    counts = np.array([(ops == i).sum() for i in range(len(OP_KINDS))])
    per_op = {k: counts[OP_KINDS.index(k)] / ops.size for k in OP_KINDS}
    for kind in ('autocontrast', 'equalize', 'invert', 'rotate', 'solarize_add', 'shear_x', 'shear_y',
                 'translate_x_rel', 'translate_y_rel'):  # the last two: TranslateXRel / TranslateYRel
        assert abs(per_op[kind] - 0.5 / 15) < 0.008, kind
    # magnitude m = clip(N(9, 0.5), 0, 10): rotation |angle| = 3 m, posterize bits 4 - int(0.4 m)
    rotation = np.abs(args[ops == OP_KINDS.index('rotate')])
    clipped_mean = 9 - 0.5 * (0.05399 - 2 * 0.02275)  # E[min(N(9, 0.5), 10)], from the normal pdf/cdf at z = 2
    assert abs(rotation.mean() - 3 * clipped_mean) < 0.3
    assert rotation.max() <= 30 and abs((args[ops == OP_KINDS.index('rotate')] > 0).mean() - 0.5) < 0.06
    bits = args[ops == OP_KINDS.index('posterize')]
    assert set(np.unique(bits)) <= {0.0, 1.0, 2.0} and abs((bits == 0).mean() - 0.0228) < 0.03
    # the enhance ops blend by 1 +- 0.9 m / 10
    factors = args[ops == OP_KINDS.index('brightness')]
    assert abs(np.abs(factors - 1).mean() - 0.09 * 9) < 0.03


def test_erasing_boxes_follow_the_random_erasing_law():
    boxes = torch.stack([x['erase'][0] for x in draws(4000)]).numpy().astype(np.float64)
    erased = boxes[:, 2] > 0
    assert abs(erased.mean() - 0.25) < 0.03
    area = boxes[erased, 2] * boxes[erased, 3] / 224 ** 2
    assert area.min() > 0.015 and area.max() < 0.35 and abs(area.mean() - (0.02 + 1 / 3) / 2) < 0.02
    assert (boxes[erased, 0] + boxes[erased, 2] <= 224).all() and (boxes[erased, 1] + boxes[erased, 3] <= 224).all()


def test_dataset_reads_bytes_and_decodes_what_nvjpeg_cannot(tmp_path):
    image = photo(40, 30)
    image.save(tmp_path / 'rgb.jpg', quality=95)
    image.convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=95)
    image.save(tmp_path / 'rgb.png')
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    good = (tmp_path / 'rgb.jpg').read_bytes()
    (tmp_path / 'truncated.jpg').write_bytes(good[:len(good) // 2])  # a valid header: only decoding fails
    names = ['rgb.jpg', 'cmyk.jpg', 'rgb.png', 'broken.jpg', 'truncated.jpg']
    augmentation = TrainAugmentation(create_transform(**{**RECIPE, 'input_size': 16}))
    dataset = gpu_input.EncodedImageDataset([(str(tmp_path / n), i) for i, n in enumerate(names)], augmentation)
    encoded, choices, targets, paths = dataset.collate([dataset[i] for i in range(5)])
    jpegs = encoded.jpegs()
    assert list(jpegs) == [0, 4] and bytes(jpegs[0].numpy()) == good and len(jpegs[4]) == len(good) // 2
    pixels = encoded.pixels
    assert pixels[0] is None and pixels[1].shape == (3, 30, 40) and pixels[2].shape == (3, 30, 40) and pixels[3] is None
    assert targets.tolist() == [0, 1, 2, 3, 4] and choices['crop'].shape == (5, 4)
    assert np.array_equal(pixels[2].permute(1, 2, 0).numpy(), np.asarray(image))  # PNG: lossless
    decoded, unreadable = gpu_input.decode_batch(encoded, 'cpu')
    assert decoded[3] is None and decoded[4] is None
    # Pillow's reasons, named in the log (wording varies across Pillow versions)
    assert sorted(unreadable) == [3, 4] and unreadable[4].startswith('OSError: image file is truncated'), unreadable
    for i in range(3):  # the JPEGs: as Pillow decodes them, up to the decoders' rounding
        want = np.asarray(Image.open(tmp_path / names[i]).convert('RGB'), dtype=np.float32)
        assert np.abs(decoded[i].permute(1, 2, 0).numpy() - want).mean() < 1.5, names[i]
    batch = gpu_input.replace_unreadable(decoded)
    assert batch[3] is decoded[0] and batch[4] is decoded[1] and len(batch) == 5
    samples = gpu_input.augment_batch(batch, choices, augmentation)
    assert samples.shape == (5, 3, 16, 16) and torch.isfinite(samples).all()


def test_unsupported_transforms_and_datasets_are_refused():
    with pytest.raises(UserError, match='ColorJitter'):
        TrainAugmentation(create_transform(**{**RECIPE, 'auto_augment': None}))
    with pytest.raises(UserError, match='--input-pipeline cpu'):
        gpu_input.encoded_dataset(torch.utils.data.TensorDataset(torch.zeros(2)), 'CIFAR10')


def test_gpu_pipeline_without_cuda_is_refused_in_one_line(capsys, tmp_path):
    code = main.cli(['--input-pipeline', 'gpu', '--device', 'cpu', '--data-path', str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count('\n') == 0 and '--input-pipeline gpu' in err and '--input-pipeline cpu' in err


def test_default_worker_count_shares_the_cores_of_the_node(monkeypatch):
    monkeypatch.setattr(main.os, 'sched_getaffinity', lambda _: set(range(16)), raising=False)
    monkeypatch.delenv('SLURM_NTASKS_PER_NODE', raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    assert main.default_num_workers() == 15
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')
    assert main.default_num_workers() == 1
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    monkeypatch.setenv('SLURM_NTASKS_PER_NODE', '4(x2)')
    assert main.default_num_workers() == 3
    monkeypatch.setattr(main.os, 'sched_getaffinity', lambda _: set(range(128)), raising=False)
    monkeypatch.setenv('SLURM_NTASKS_PER_NODE', '1')
    assert main.default_num_workers() == 16


def test_unreadable_files_are_counted_as_on_the_cpu_path(tmp_path):
    root = write_folder(tmp_path)
    broken = root / 'train' / 'class1' / 'broken.jpg'
    broken.write_bytes(b'not a jpeg')
    folder = ImageFolder(str(root / 'train'), transform=create_transform(**{**RECIPE, 'input_size': 32}))
    dataset = gpu_input.encoded_dataset(folder, 'folder')

    def one_pass(limit):
        loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=dataset.collate)  # 25 files
        count = BadImageCount(limit, 'training')
        for samples, _ in gpu_input.GpuTrainLoader(loader, dataset.augmentation, 'cpu', bad_images=count):
            assert samples.shape[0] == 5  # the unreadable file was replaced, the batch kept its size
        return count

    assert one_pass(limit=5).named == {f'{broken}: not an image in a format Pillow reads'}
    with pytest.raises(UserError, match='the run stops at the first one'):
        one_pass(limit=0)


def test_the_trainers_folder_data_set_feeds_the_gpu_path(tmp_path):
    """What build_dataset returns for class folders (an ImageSource over the files) is read as files."""
    from datasets import build_dataset

    root = write_folder(tmp_path)
    args = main.get_args_parser().parse_args(['--data-set', 'folder', '--data-path', str(root), '--input-size', '64'])
    source, _ = build_dataset(True, args)
    dataset = gpu_input.encoded_dataset(source, 'folder')
    assert [path for path, _ in dataset.samples] == [source.name_of(i) for i in range(len(source))]
