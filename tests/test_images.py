"""Image files: the default training transform over many odd images, every mode and format to the right
8-bit RGB pixels, unreadable files skipped, named and counted, --verify-images, and the data sets read
through timm (tar, torch/) or Hugging Face's datasets package (hfds/)."""
import argparse
import importlib.metadata
import io
import json
import os
import random
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision.transforms import PILToTensor

import datasets
import main as trainer
from trainer.image_files import BadImageCount, CountingLoader, ImageSource, collate, decode, is_image_file, to_rgb
from test_trainer import REPO, make_image_folder, run_trainer, tiny_args
from trainer import UserError, gpu_input

pytestmark = pytest.mark.usefixtures('one_thread')


def random_image(rng):
    """An image of random size (1 px, thin strips, ordinary), aspect ratio and mode."""
    w, h = [(1, 1), (1, 60), (80, 2), (3, 5), (int(rng.integers(8, 64)), int(rng.integers(8, 64)))][rng.integers(5)]
    mode = ['RGB', 'L', 'P', 'RGBA', 'I;16', 'CMYK', '1'][rng.integers(7)]
    if mode == 'I;16':
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return image.convert('CMYK') if mode == 'CMYK' else image.convert(mode)


def test_default_training_transform_never_fails(monkeypatch):
    # rand-m9-mstd0.5-inc1 draws magnitude 10 (PosterizeIncreasing: 0 bits) for ~2% of its ops; the
    # posterize ops are counted to show that the draws reached that case.
    bits_seen, own = [], datasets.posterize
    monkeypatch.setattr(datasets, 'posterize', lambda image, bits, **kw: bits_seen.append(bits) or own(image, bits))
    args = trainer.get_args_parser().parse_args(['--input-size', '48'])  # the recipe's augmentation defaults
    transform = datasets.build_transform(True, args)
    rng = np.random.default_rng(0)
    images = [to_rgb(random_image(rng)) for _ in range(200)]
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    for i in range(8000):
        out = transform(images[i % len(images)])
        assert out.shape == (3, 48, 48) and torch.isfinite(out).all()
    assert bits_seen.count(0) >= 5


def test_posterize_matches_pillow_and_gives_black_for_zero_bits():
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(datasets.posterize(image, bits)), np.asarray(ImageOps.posterize(image, bits)))
    assert not np.asarray(datasets.posterize(image, 0)).any()
    # only the posterize ops are replaced; the others keep timm's functions
    args = trainer.get_args_parser().parse_args([])
    ops = next(t for t in datasets.build_transform(True, args).transforms if hasattr(t, 'ops')).ops
    assert [op.name for op in ops if op.aug_fn is datasets.posterize] == ['PosterizeIncreasing']


@pytest.mark.parametrize('policy', ['rand-m9-mstd0.5-inc1', 'rand-m9-mstd0.5', 'original', 'originalr', 'v0', 'v0r',
                                    '3a'])
def test_every_augmentation_op_at_both_magnitude_ends(policy):
    # The magnitude noise reaches 0 and 10 (clamped there); every op of the policy must take both on an
    # RGB image, tiny ones included (what the transform gets after the crop, at any input size).
    args = trainer.get_args_parser().parse_args(['--input-size', '32', '--aa', policy])
    stage = datasets.build_transform(True, args).transforms[2]
    ops = getattr(stage, 'ops', None) or [op for ops in stage.policy for op in ops]
    assert ops
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0
        for magnitude in (0, 10):
            op.magnitude = magnitude
            for size in ((1, 1), (3, 40), (32, 32)):
                out = op(Image.new('RGB', size, (200, 100, 50)))
                assert out.size == size and out.mode == 'RGB'


def test_tiny_images_with_tiny_input_size():
    args = trainer.get_args_parser().parse_args(['--input-size', '32'])
    transform = datasets.build_transform(True, args)
    assert transform(Image.new('RGB', (5, 3))).shape == (3, 32, 32)  # smaller than the crop: padded


def saved(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def pixels(path):
    return np.asarray(decode(str(path))).reshape(-1, 3).tolist()


def test_sixteen_bit_and_float_images_are_scaled(tmp_path):
    values = np.array([[0, 25700, 65535, 1000]], dtype=np.uint16)  # 25700 = 100 x 257
    png = saved(tmp_path, Image.fromarray(values), 'deep.png')
    assert Image.open(png).mode in ('I;16', 'I')  # Pillow's mode for it depends on its version
    assert pixels(png) == [[v] * 3 for v in (0, 100, 255, 4)]  # 1000 * 255 / 65535 = 3.9
    as_int = saved(tmp_path, Image.fromarray(values.astype(np.int32)), 'int.tif')
    assert Image.open(as_int).mode == 'I' and pixels(as_int) == [[v] * 3 for v in (0, 100, 255, 4)]
    unit = saved(tmp_path, Image.fromarray(np.array([[0, 0.5, 1, 0.25]], dtype=np.float32)), 'unit.tif')
    assert Image.open(unit).mode == 'F' and pixels(unit) == [[v] * 3 for v in (0, 128, 255, 64)]
    wide = saved(tmp_path, Image.fromarray(np.array([[0, 10, 300, -5]], dtype=np.float32)), 'wide.tif')
    assert pixels(wide) == [[v] * 3 for v in (0, 10, 255, 0)]


def test_cmyk_palette_and_alpha(tmp_path):
    cmyk = Image.new('CMYK', (3, 1))
    for x, value in enumerate([(255, 0, 0, 0), (0, 0, 0, 255), (0, 128, 0, 0)]):
        cmyk.putpixel((x, 0), value)
    assert pixels(saved(tmp_path, cmyk, 'c.tif')) == [[0, 255, 255], [0, 0, 0], [255, 127, 255]]

    palette = Image.new('P', (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    gif = saved(tmp_path, palette, 'p.gif', transparency=1)  # green is the transparent colour
    assert pixels(gif) == [[255, 0, 0], [255, 255, 255]]
    assert pixels(saved(tmp_path, palette, 'p.png')) == [[255, 0, 0], [0, 255, 0]]  # no transparency

    rgba = Image.new('RGBA', (3, 1))
    for x, value in enumerate([(255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)]):
        rgba.putpixel((x, 0), value)
    got = pixels(saved(tmp_path, rgba, 'a.png'))
    assert got[:2] == [[255, 0, 0], [255, 255, 255]]  # transparent -> white
    assert all(abs(v - 127) <= 1 for v in got[2])  # black at alpha 128/255 over white: 255 * 127/255
    la = Image.new('LA', (2, 1))
    la.putpixel((0, 0), (100, 255))
    la.putpixel((1, 0), (100, 0))
    assert pixels(saved(tmp_path, la, 'la.png')) == [[100, 100, 100], [255, 255, 255]]
    grey = saved(tmp_path, Image.new('1', (2, 1), 1), 'one.bmp')
    assert pixels(grey) == [[255, 255, 255]] * 2
    webp = saved(tmp_path, Image.new('RGB', (2, 2), (10, 200, 30)), 'w.webp', lossless=True)
    assert pixels(webp) == [[10, 200, 30]] * 4


def test_files_are_taken_by_extension_or_content(tmp_path):
    os.makedirs(tmp_path / 'train' / 'cat')
    folder = tmp_path / 'train' / 'cat'
    Image.new('RGB', (4, 4), (1, 2, 3)).save(folder / 'anim.gif')
    Image.new('RGB', (4, 4), (1, 2, 3)).save(folder / 'no_extension', format='PNG')
    (folder / 'notes.txt').write_text('not an image')
    (folder / '._resource.jpg').write_bytes(b'\0' * 10)  # hidden: ignored
    dataset = datasets.CheckedImageFolder(str(tmp_path / 'train'))
    assert sorted(os.path.basename(p) for p, _ in dataset.samples) == ['anim.gif', 'no_extension']
    assert sorted(os.path.basename(p) for p in dataset.ignored) == ['._resource.jpg', 'notes.txt']
    assert is_image_file(str(folder / 'x.tiff')) and not is_image_file(str(folder / 'notes.txt'))


def make_bad_files(folder):
    """One of each kind of unreadable file; returns their paths."""
    good = open(os.path.join(folder, '0.png'), 'rb').read()
    bad = {'empty.png': b'', 'truncated.png': good[:60], 'text.jpg': b'hello',
           'garbage.png': b'\x89PNG\r\n\x1a\n' + b'x' * 50,
           'corrupt.png': good[:40] + b'\0' * (len(good) - 40)}
    for name, data in bad.items():
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(data)
    return sorted(os.path.join(folder, name) for name in bad)


def test_unreadable_files_are_substituted_and_reported(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1)
    bad = make_bad_files(os.path.join(data, 'train', 'square'))
    source = ImageSource(datasets.CheckedImageFolder(os.path.join(data, 'train')), transform=np.asarray)
    assert len(source) == 6 + len(bad)
    index = source.base.samples.index((bad[0], 1))  # the 5 bad squares sort last: next readable is a stripe
    image, target, unreadable = source[index]
    assert target == 2 and np.array_equal(image, np.asarray(Image.open(source.base.samples[index + 5][0])))
    assert [line.split(': ')[0] for line in unreadable] == bad
    again = source[index]
    assert np.array_equal(again[0], image) and again[2] == unreadable  # deterministic (resume)
    reported = {line.split(': ')[0] for i in range(len(source)) for line in source[i][2]}
    assert sorted(reported) == bad

    for workers in (0, 2):  # counts reach the main process from loader workers
        count = BadImageCount(limit=100, purpose='training')
        loader = CountingLoader(ImageSource(source.base, transform=PILToTensor()),
                                count, batch_size=3, num_workers=workers)
        batches = list(loader)
        assert all(len(b) == 2 for b in batches) and sum(len(t) for _, t in batches) == len(source)
        assert count.named == {line for i in range(len(source)) for line in source[i][2]}
        assert count.epoch == set()  # the complete pass ended the epoch's count

    count = BadImageCount(limit=2, purpose='evaluation')
    with pytest.raises(UserError, match=r'unreadable image\(s\) in evaluation, more than --max-bad-images 2.*'
                                        r'rerun the evaluation'):
        list(CountingLoader(ImageSource(source.base, transform=PILToTensor()), count, batch_size=20))
    # evaluation drops the substitutes: each readable image counted once
    evaluation = CountingLoader(ImageSource(source.base, transform=lambda im: torch.zeros(1)),
                                BadImageCount(100, 'evaluation'), drop_substitutes=True, batch_size=4)
    assert sum(len(t) for _, t in evaluation) == 6


def test_trainer_skips_counts_and_stops_on_bad_files(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=4, val_per_class=1)
    bad = make_bad_files(os.path.join(data, 'train', 'square'))
    def argv(out, *extra):  # a new output folder each time: no resume
        return tiny_args(data, tmp_path / out, '--epochs', '1', '--no-repeated-aug', '--num_workers', '1', *extra)
    assert run_trainer(argv('skip')) == 0
    out = capsys.readouterr().out
    assert all(f'skipped unreadable image {path}: ' in out for path in bad)
    assert 'epoch 0: 5 unreadable image(s) skipped' in out

    assert run_trainer(argv('limit', '--max-bad-images', '4')) == 2
    err = capsys.readouterr().err
    assert 'more than --max-bad-images 4' in err and 'training resumes from the last checkpoint' in err
    assert run_trainer(argv('strict', '--strict-images')) == 2
    assert 'the run stops at the first one (--strict-images)' in capsys.readouterr().err

    val_bad = make_bad_files(os.path.join(data, 'val', 'circle'))
    assert run_trainer(argv('eval', '--eval', '--eval-untrained', '--strict-images')) == 2
    err = capsys.readouterr().err
    assert 'in evaluation' in err and 'rerun the evaluation' in err and 'resum' not in err
    assert run_trainer(argv('eval', '--eval', '--eval-untrained')) == 0
    out = capsys.readouterr().out
    assert 'on the 3 test images' in out and all(path in out for path in val_bad)  # bad ones not counted


def test_verify_images_lists_every_unreadable_file(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1)
    bad = make_bad_files(os.path.join(data, 'train', 'circle'))
    argv = tiny_args(data, tmp_path / 'out', '--verify-images', '--num_workers', '2')
    assert run_trainer(argv) == 2
    captured = capsys.readouterr()
    listed = sorted(line.split('unreadable: ')[1].split(': ')[0] for line in captured.out.splitlines()
                    if line.startswith('unreadable: '))
    assert listed == bad
    assert f'{len(bad)} of {6 + 3 + len(bad)} images cannot be read' in captured.err
    for path in bad:
        os.remove(path)
    assert run_trainer(argv) == 0
    assert 'all 9 images are readable' in capsys.readouterr().out


def write_tar(path, members):
    with tarfile.open(path, 'w') as tar:
        for name, image in members.items():
            buffer = io.BytesIO()
            image.save(buffer, format='PNG' if name.endswith('.png') else 'GIF')
            info = tarfile.TarInfo(name)
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)


def test_tar_data_set_through_timm(tmp_path):
    red, blue = Image.new('RGB', (4, 4), (255, 0, 0)), Image.new('RGB', (4, 4), (0, 0, 255))
    write_tar(tmp_path / 'train.tar', {'ant/1.png': red, 'bee/2.gif': blue, 'cow/3.png': red})
    write_tar(tmp_path / 'val.tar', {'bee/4.png': blue})  # no ant or cow: indices must follow train's
    args = trainer.get_args_parser().parse_args(['--data-set', 'tar', '--data-path', str(tmp_path), '--input-size',
                                                 '16'])
    train, classes = datasets.build_dataset(True, args)
    assert classes == 3 and len(train) == 3  # the .gif is taken
    val, _ = datasets.build_dataset(False, args)
    image, target, unreadable = val[0]
    assert target == 1 and unreadable == () and image.shape == (3, 16, 16)
    assert image[2].mean() > image[0].mean()  # blue
    with pytest.raises(UserError, match="--input-pipeline gpu reads image files"):
        gpu_input.encoded_dataset(train, 'tar')  # its members are no files: refused in one line


def test_timm_torchvision_data_set_and_names(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1)
    args = trainer.get_args_parser().parse_args(['--data-set', 'torch/folder', '--data-path', data,
                                                 '--input-size', '32'])
    val, classes = datasets.build_dataset(False, args)
    assert classes == 3 and len(val) == 3 and [val[i][1] for i in range(3)] == [0, 1, 2]
    assert val[0][0].shape == (3, 32, 32) and val[0][2] == ()
    with pytest.raises(argparse.ArgumentTypeError, match='unknown --data-set IMAGENET'):
        datasets.data_set_name('IMAGENET')


def hugging_face_or_skip():
    # not pytest.importorskip('datasets'): that name imports the trainer's datasets.py
    try:
        importlib.metadata.version('datasets')
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('needs the Hugging Face datasets package (pip install datasets)')


def hfds_args(data, cache, *extra):
    return trainer.get_args_parser().parse_args(['--data-set', f'hfds/{data}', '--data-path', str(cache),
                                                 '--input-size', '16', *extra])


def items_by_file(source):
    """{file name: (RGB pixels, class, unreadable)} of an ImageSource, its transform left out."""
    source.transform = None
    items = [source[i] for i in range(len(source))]
    return {os.path.basename(source.name_of(i)): (np.asarray(image).reshape(-1, 3).tolist(), target, unreadable)
            for i, (image, target, unreadable) in enumerate(items)}


def test_hugging_face_image_folder(tmp_path):
    hugging_face_or_skip()
    palette = Image.new('P', (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    files = {'train/ant/rgb.png': Image.new('RGB', (2, 1), (10, 20, 30)),
             'train/ant/deep.png': Image.fromarray(np.array([[0, 25700, 65535, 1000]], dtype=np.uint16)),
             'train/bee/palette.png': palette,
             'val/ant/a.png': Image.new('L', (1, 1), 7), 'val/bee/b.png': Image.new('RGB', (1, 1), (0, 0, 255))}
    for name, image in files.items():
        os.makedirs(tmp_path / 'pets' / os.path.dirname(name), exist_ok=True)
        image.save(tmp_path / 'pets' / name)
    broken = tmp_path / 'pets' / 'train' / 'bee' / 'broken.png'
    broken.write_bytes(b'not an image')
    args = hfds_args(tmp_path / 'pets', tmp_path / 'cache')
    train, classes = datasets.build_dataset(True, args)
    assert classes == 2 and train.classes == ['ant', 'bee'] and len(train) == 4
    val, _ = datasets.build_dataset(False, args)  # val/ is the validation split
    assert val[0][0].shape == (3, 16, 16)
    assert items_by_file(val) == {'a.png': ([[7, 7, 7]], 0, ()), 'b.png': ([[0, 0, 255]], 1, ())}
    got = items_by_file(train)
    assert got['rgb.png'] == ([[10, 20, 30]] * 2, 0, ())
    assert got['deep.png'] == ([[0] * 3, [100] * 3, [255] * 3, [4] * 3], 0, ())  # 16 bits scaled: 1000 -> 3.9
    assert got['palette.png'] == ([[255, 0, 0], [0, 255, 0]], 1, ())
    (line,) = got['broken.png'][2]  # replaced by another image, named
    assert line == f'{broken}: not an image in a format Pillow reads'
    assert sys.modules['datasets'] is datasets


def test_hugging_face_parquet_files_columns_and_splits(tmp_path):
    hugging_face_or_skip()
    def png(colour):
        buffer = io.BytesIO()
        Image.new('RGB', (1, 1), colour).save(buffer, format='PNG')
        return {'bytes': buffer.getvalue(), 'path': None}
    with datasets.hugging_face_datasets() as hf:  # writing parquet imports more of the package
        features = hf.Features({'image': hf.Image(), 'label': hf.ClassLabel(names=['cat', 'dog'])})
        for split, colours, labels in (('train', [(1, 2, 3)], [1]), ('test', [(9, 8, 7), (4, 5, 6)], [1, 0])):
            table = hf.Dataset.from_dict({'image': [png(c) for c in colours], 'label': labels}, features=features)
            table.to_parquet(str(tmp_path / 'parquet' / f'{split}.parquet'))
        other = hf.Features({'img': hf.Image(), 'fine_label': hf.ClassLabel(names=['a', 'b', 'c'])})
        other_columns = hf.Dataset.from_dict({'img': [png((0, 0, 0))], 'fine_label': [2]}, features=other)
        other_columns.to_parquet(str(tmp_path / 'other' / 'train.parquet'))
    assert sys.modules['datasets'] is datasets
    with pytest.raises(UserError, match=r'Unknown split "validation".*: name the splits with --train-split and '
                                        r'--val-split$'):
        datasets.build_dataset(False, hfds_args(tmp_path / 'parquet', tmp_path / 'cache'))
    val, classes = datasets.build_dataset(False, hfds_args(tmp_path / 'parquet', tmp_path / 'cache', '--val-split',
                                                           'test'))
    assert classes == 2 and val.name_of(1) == f'hfds/{tmp_path / "parquet"} test item 1'
    source = ImageSource(val.base, transform=PILToTensor())
    spawned = DataLoader(source, batch_size=2, num_workers=1, multiprocessing_context='spawn', collate_fn=collate)
    (images, targets, _), = list(spawned)  # the workers rebuild the data set from the cache
    assert images[:, :, 0, 0].tolist() == [[9, 8, 7], [4, 5, 6]] and targets.tolist() == [1, 0]
    sliced, _ = datasets.build_dataset(False, hfds_args(tmp_path / 'parquet', tmp_path / 'cache', '--val-split',
                                                        'test[1:]'))
    assert len(sliced) == 1 and sliced.base[0][1] == 0 and decode(sliced.base[0][0]).getpixel((0, 0)) == (4, 5, 6)
    with pytest.raises(UserError, match=r'has the columns img, fine_label: the trainer reads the images from "image" '
                                        r'\(--input-key\) and the classes from the class-label column "label" '
                                        r'\(--target-key\)'):
        datasets.build_dataset(True, hfds_args(tmp_path / 'other', tmp_path / 'cache'))
    named, classes = datasets.build_dataset(True, hfds_args(tmp_path / 'other', tmp_path / 'cache', '--input-key',
                                                            'img', '--target-key', 'fine_label'))
    assert classes == 3 and named.base[0][1] == 2 and decode(named.base[0][0]).getpixel((0, 0)) == (0, 0, 0)


def test_hugging_face_package_missing(monkeypatch):
    monkeypatch.setattr(sys, 'path', [REPO])
    with pytest.raises(UserError, match='--data-set hfds/NAME needs the Hugging Face datasets package: pip install '
                                        'datasets'):
        datasets._import_hugging_face_datasets.__wrapped__()  # uncached
    assert sys.modules['datasets'] is datasets


def test_trainer_on_a_hugging_face_data_set(tmp_path, capsys):
    hugging_face_or_skip()
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1)
    broken = os.path.join(data, 'train', 'square', 'broken.png')
    with open(broken, 'wb') as f:
        f.write(b'not an image')
    argv = tiny_args(tmp_path / 'cache', tmp_path / 'out', '--epochs', '1', '--num-workers', '1',
                     '--data-set', f'hfds/{data}')
    assert run_trainer(argv) == 0
    out = capsys.readouterr().out
    assert f'skipped unreadable image {broken}: ' in out and 'epoch 0: 1 unreadable image(s) skipped' in out
    record = json.loads((tmp_path / 'out' / 'log.txt').read_text())
    assert record['test_num_images'] == 3
