"""The GPU input path (`main.py --input-pipeline gpu`): loader workers only read file bytes, the GPU decodes
and augments whole batches.

Per sample, a worker reads the file, its header (size, mode) and draws every random choice of the training
transform (`TrainAugmentation.draw`): the same timm objects, in the same order and from the same random
streams as the CPU path, so under one sample seed both paths pick the same crop, flip, RandAugment ops and
magnitudes and erasing box. On the GPU, `augment_batch` applies those choices to the batch: nvJPEG decodes
(`torchvision.io.decode_jpeg` on CUDA), then resized crop, flip, the RandAugment ops (grouped by op),
normalisation and random erasing. Files nvJPEG cannot take (not JPEG, CMYK JPEG) are decoded by the worker
on the CPU; a file that cannot be read at all is replaced by another image of its batch and counted as on the
CPU path (trainer.image_files.BadImageCount).
Evaluation keeps the CPU path. The batched ops work on CPU tensors too, which the tests compare with PIL.
"""
import io
import math
import os
import queue
import random
import threading

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from trainer.image_files import BadImage, as_bad_image, decode
from trainer import UserError

INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic')
NVJPEG_MODES = ('RGB', 'L')  # JPEG modes nvJPEG decodes to RGB (YCbCr and greyscale); CMYK goes to the CPU
# timm RandAugment op name -> (our op, whether its pixels move: those draw a resampling filter)
OPS = {
    'AutoContrast': ('autocontrast', False), 'Equalize': ('equalize', False), 'Invert': ('invert', False),
    'Posterize': ('posterize', False), 'PosterizeIncreasing': ('posterize', False),
    'PosterizeOriginal': ('posterize', False), 'Solarize': ('solarize', False),
    'SolarizeIncreasing': ('solarize', False), 'SolarizeAdd': ('solarize_add', False),
    'Color': ('color', False), 'ColorIncreasing': ('color', False), 'Contrast': ('contrast', False),
    'ContrastIncreasing': ('contrast', False), 'Brightness': ('brightness', False),
    'BrightnessIncreasing': ('brightness', False), 'Sharpness': ('sharpness', False),
    'SharpnessIncreasing': ('sharpness', False), 'Rotate': ('rotate', True), 'ShearX': ('shear_x', True),
    'ShearY': ('shear_y', True), 'TranslateXRel': ('translate_x_rel', True),
    'TranslateYRel': ('translate_y_rel', True), 'TranslateX': ('translate_x', True),
    'TranslateY': ('translate_y', True),
}
OP_KINDS = sorted({kind for kind, _ in OPS.values()})
MOVING_KINDS = {kind for kind, moves in OPS.values() if moves}
NO_OP = -1


def interpolation_code(mode):
    """Index into INTERPOLATIONS of a torchvision InterpolationMode or a PIL resampling filter."""
    name = getattr(mode, 'value', None) if isinstance(mode, transforms.InterpolationMode) else getattr(mode, 'name', '')
    name = str(name).lower()
    if name not in INTERPOLATIONS:
        raise UserError(f'--input-pipeline gpu resamples with {", ".join(INTERPOLATIONS)}, not {mode}: '
                        f'change --train-interpolation or use --input-pipeline cpu')
    return INTERPOLATIONS.index(name)


class TrainAugmentation:
    """The random choices of a timm training transform (create_transform's Compose), drawn per sample."""

    def __init__(self, transform):
        self.flip_p, self.randaug, self.erasing = 0.0, None, None
        for t in transform.transforms:
            if isinstance(t, RandomResizedCropAndInterpolation):
                self.crop = t
            elif isinstance(t, transforms.RandomHorizontalFlip):
                self.flip_p = t.p
            elif isinstance(t, RandAugment):
                self.randaug = t
                for op in t.ops:
                    if op.name not in OPS:
                        raise UserError(f'--input-pipeline gpu has no batched {op.name} (--aa): '
                                        f'use --input-pipeline cpu')
            elif isinstance(t, transforms.Normalize):
                self.mean, self.std = torch.as_tensor(t.mean).tolist(), torch.as_tensor(t.std).tolist()
            elif isinstance(t, RandomErasing):
                if t.mode != 'pixel':
                    raise UserError(f'--input-pipeline gpu erases in --remode pixel only, not {t.mode}')
                self.erasing = t
            elif not isinstance(t, transforms.ToTensor):
                raise UserError(f'--input-pipeline gpu cannot apply {type(t).__name__} (from --color-jitter with --aa '
                                f'none, or --input-size <= 32): use --input-pipeline cpu')
        self.size = self.crop.size
        self.layers = self.randaug.num_layers if self.randaug else 0
        self.erase_count = self.erasing.max_count if self.erasing else 0

    def draw(self, image):
        """All random choices for one sample, given its (header-only) PIL image: a dict of small tensors."""
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        flip = bool(torch.rand(1) < self.flip_p)
        ops = torch.full((self.layers,), NO_OP, dtype=torch.long)
        op_args = torch.zeros(self.layers, dtype=torch.float64)
        op_interpolation = torch.zeros(self.layers, dtype=torch.long)
        if self.randaug:
            ra = self.randaug
            chosen = np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
            for layer, op in enumerate(chosen):
                if op.prob < 1.0 and random.random() > op.prob:
                    continue
                magnitude = op.magnitude
                if op.magnitude_std == float('inf'):
                    magnitude = random.uniform(0, magnitude)
                elif op.magnitude_std > 0:
                    magnitude = random.gauss(magnitude, op.magnitude_std)
                magnitude = max(0.0, min(magnitude, op.magnitude_max or 10.0))
                args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else (0.0,)
                kind, moves = OPS[op.name]
                ops[layer], op_args[layer] = OP_KINDS.index(kind), float(args[0])
                if moves:
                    resample = op.kwargs['resample']
                    op_interpolation[layer] = interpolation_code(
                        random.choice(resample) if isinstance(resample, (tuple, list)) else resample)
        return {'crop': torch.tensor([top, left, height, width]), 'interpolation': interpolation_code(interpolation),
                'flip': flip, 'ops': ops, 'op_args': op_args, 'op_interpolation': op_interpolation,
                'erase': self.draw_erasing(), 'noise_seed': random.getrandbits(62)}

    def draw_erasing(self):
        """(count, 4) boxes top, left, height, width (height 0: none) as timm's RandomErasing picks them."""
        boxes = torch.zeros(self.erase_count, 4, dtype=torch.long)
        e = self.erasing
        if e is None or random.random() > e.probability:
            return boxes
        img_h, img_w = self.size
        count = e.min_count if e.min_count == e.max_count else random.randint(e.min_count, e.max_count)
        for box in range(count):
            for _ in range(10):
                area = random.uniform(e.min_area, e.max_area) * img_h * img_w / count
                aspect = math.exp(random.uniform(*e.log_aspect_ratio))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < img_w and h < img_h:
                    boxes[box] = torch.tensor([random.randint(0, img_h - h), random.randint(0, img_w - w), h, w])
                    break
        return boxes


class EncodedImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (encoded image, augmentation choices, label, path).

    The encoded image is the file's bytes for a JPEG nvJPEG decodes, the decoded image (CHW uint8 tensor) for
    any other file Pillow reads, and None for a file that cannot be read.
    """

    def __init__(self, samples, augmentation):
        self.samples, self.augmentation = samples, augmentation

    @staticmethod
    def collate(items):
        """A batch: (EncodedBatch, dict of stacked choices, labels, paths)."""
        encoded, choices, targets, paths = zip(*items)
        stacked = {key: torch.stack([torch.as_tensor(c[key]) for c in choices]) for key in choices[0]}
        return EncodedBatch(encoded), stacked, torch.tensor(targets), list(paths)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            with open(path, 'rb') as f:
                data = f.read()
            image = Image.open(io.BytesIO(data))  # reads the header only
            choices = self.augmentation.draw(image)
            encoded = data if image.format == 'JPEG' and image.mode in NVJPEG_MODES else pil_to_tensor(decode(image))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, BadImage) as err:
            encoded = as_bad_image(err)  # the reason, for the log
            choices = self.augmentation.draw(Image.new('RGB', self.augmentation.size[::-1]))
        return encoded, choices, target, path


class EncodedBatch:
    """A batch's encoded images: all JPEG bytes in one tensor (one shared-memory block between processes, where
    a tensor per image would cost a file descriptor each), the images the workers decoded, and why the workers
    could not read the others ({index in the batch: reason})."""

    def __init__(self, encoded):
        jpegs = [e if isinstance(e, bytes) else b'' for e in encoded]
        self.jpeg_bytes = torch.frombuffer(bytearray().join(jpegs) or bytearray(1), dtype=torch.uint8)
        self.jpeg_lengths = torch.tensor([len(j) for j in jpegs])
        self.pixels = [e if isinstance(e, torch.Tensor) else None for e in encoded]
        self.unreadable = {i: str(e) for i, e in enumerate(encoded) if isinstance(e, BadImage)}

    def __len__(self):
        return len(self.pixels)

    def jpegs(self):
        """{index in the batch: 1-D uint8 tensor of the JPEG's bytes}"""
        ends = self.jpeg_lengths.cumsum(0).tolist()
        return {i: self.jpeg_bytes[end - length:end]
                for i, (end, length) in enumerate(zip(ends, self.jpeg_lengths.tolist())) if length}


def pil_to_tensor(image):
    """CHW uint8 of an RGB PIL image (as trainer.image_files.decode returns)."""
    # copy(): the CHW array in C order, writable (np.asarray of a PIL image is a read-only view)
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())


def decode_batch(encoded, device):
    """(CHW uint8 images on `device`, {index: why that file is unreadable}) from an EncodedBatch: the JPEGs
    through nvJPEG (on CUDA) in one call, the rest as the workers decoded them. A JPEG nvJPEG rejects is
    decoded by Pillow; an unreadable file's image is None."""
    images = [p.to(device, non_blocking=True) if p is not None else None for p in encoded.pixels]
    unreadable = dict(encoded.unreadable)
    jpegs = encoded.jpegs()
    if jpegs:
        try:
            decoded = decode_jpeg(list(jpegs.values()), mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: decode each on its own
            decoded = [decode_one(data, device) for data in jpegs.values()]
        for i, image in zip(jpegs, decoded):
            if isinstance(image, BadImage):
                unreadable[i] = str(image)
            else:
                images[i] = image
    return images, unreadable


def decode_one(data, device):
    """One JPEG's image on `device`, or the BadImage saying why it cannot be decoded."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        try:
            return pil_to_tensor(decode(data.numpy().tobytes())).to(device)
        except BadImage as err:
            return err


def resized_crops(images, crop, interpolation, size):
    """Crop each CHW uint8 image to its (top, left, height, width) box and resize it to `size`, antialiased as
    Pillow resizes: a (B, C, H, W) float batch with integer values in [0, 255]."""
    out = []
    for image, (top, left, height, width), mode in zip(images, crop.tolist(), interpolation.tolist()):
        box = image[None, :, top:top + height, left:left + width].float()
        mode = INTERPOLATIONS[mode]
        out.append(F.interpolate(box, size=size, mode=mode, antialias=mode != 'nearest',
                                 align_corners=None if mode == 'nearest' else False))
    return torch.cat(out).round_().clamp_(0, 255)


def blend(degenerate, x, factor):
    """Pillow's Image.blend(degenerate, x, factor) on 8-bit values: truncated towards zero and clipped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255).floor()


def grey(x):
    """Pillow's RGB -> L conversion (ITU-R 601-2 luma, fixed point, rounded): (B, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def equalize(x):
    """Pillow's ImageOps.equalize per channel: a lookup table from the cumulative histogram."""
    b, c = x.shape[:2]
    values = x.reshape(b * c, -1).long()
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, values, torch.ones_like(values))
    last = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(1, keepdim=True)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return lut.gather(1, values).reshape(x.shape).to(x.dtype)


def autocontrast(x):
    """Pillow's ImageOps.autocontrast (no cutoff) per channel: stretch min..max to 0..255."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    scale = 255 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, (x * scale - lo * scale).floor().clamp(0, 255), x)


def sharpen(x, factor):
    """Pillow's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (borders unfiltered)."""
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    smooth = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), kernel[None, None] / 13).reshape(*x.shape[:2],
                                                                                      x.shape[2] - 2, x.shape[3] - 2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = (smooth + 0.5).floor()
    return blend(degenerate, x, factor)


def pixel_op(kind, x, arg):
    """One RandAugment colour op on a (B, 3, H, W) batch of 8-bit values, with per-sample arguments (B,)."""
    a = arg.view(-1, 1, 1, 1).to(x.dtype)
    if kind == 'autocontrast':
        return autocontrast(x)
    if kind == 'equalize':
        return equalize(x)
    if kind == 'invert':
        return 255 - x
    if kind == 'posterize':  # keep the top `bits` bits (8 or more: unchanged, 0: black)
        step = torch.exp2(8 - a.clamp(max=8))
        return torch.floor(x / step) * step
    if kind == 'solarize':
        return torch.where(x >= a, 255 - x, x)
    if kind == 'solarize_add':
        return torch.where(x < 128, (x + a).clamp(max=255), x)
    if kind == 'color':
        return blend(grey(x), x, arg)
    if kind == 'contrast':
        mean = (grey(x).mean((1, 2, 3), keepdim=True) + 0.5).floor()
        return blend(mean, x, arg)
    if kind == 'brightness':
        return blend(torch.zeros_like(x), x, arg)
    if kind == 'sharpness':
        return sharpen(x, arg)
    raise ValueError(kind)


def affine_matrices(kind, arg, height, width):
    """(B, 2, 3) maps from output to input pixel coordinates (pixel centres at +0.5), as Pillow's
    Image.transform(AFFINE) and Image.rotate (about the centre) take them."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if kind == 'rotate':
        angle = -torch.deg2rad(arg)
        cos, sin = torch.cos(angle), torch.sin(angle)
        cx, cy = width / 2, height / 2
        rows = [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]
    elif kind == 'shear_x':
        rows = [one, arg, zero, zero, one, zero]
    elif kind == 'shear_y':
        rows = [one, zero, zero, arg, one, zero]
    elif kind in ('translate_x', 'translate_x_rel'):
        shift = arg * width if kind == 'translate_x_rel' else arg
        rows = [one, zero, shift, zero, one, zero]
    else:
        shift = arg * height if kind == 'translate_y_rel' else arg
        rows = [one, zero, zero, zero, one, shift]
    return torch.stack(rows, 1).view(-1, 2, 3)


def warp(x, matrices, interpolation, fill):
    """Resample each image through its affine map; pixels whose source lies outside the image get `fill`."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype, device=x.device) + 0.5,
                            torch.arange(w, dtype=x.dtype, device=x.device) + 0.5, indexing='ij')
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)
    source = (points @ matrices.to(x.dtype).transpose(1, 2)).view(b, h, w, 2)
    inside = ((source[..., 0] >= 0) & (source[..., 0] < w) & (source[..., 1] >= 0) & (source[..., 1] < h))[:, None]
    grid = source / torch.tensor([w / 2, h / 2], dtype=x.dtype, device=x.device) - 1
    moved = F.grid_sample(x, grid, mode=interpolation, padding_mode='border', align_corners=False)
    fill = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return torch.where(inside, moved.round().clamp(0, 255), fill)


def randaugment(x, ops, op_args, op_interpolation, fill):
    """Apply each layer's op per sample, one batched call per op present (ops: (B, layers), NO_OP: none)."""
    for layer in range(ops.shape[1]):
        for code in ops[:, layer].unique().tolist():
            if code == NO_OP:
                continue
            kind = OP_KINDS[code]
            chosen = (ops[:, layer] == code).nonzero()[:, 0]
            if kind in MOVING_KINDS:
                for mode in op_interpolation[chosen, layer].unique().tolist():
                    part = chosen[op_interpolation[chosen, layer] == mode]
                    index = part.to(x.device)
                    matrices = affine_matrices(kind, op_args[part, layer].to(device=x.device, dtype=torch.float64),
                                               *x.shape[2:])
                    x[index] = warp(x[index], matrices, INTERPOLATIONS[mode], fill)
            else:
                index = chosen.to(x.device)
                x[index] = pixel_op(kind, x[index], op_args[chosen, layer].to(device=x.device, dtype=x.dtype))
    return x


def erase(x, boxes, generator=None):
    """Fill each (top, left, height, width) box (height 0: none) of the normalised batch with N(0, 1) noise."""
    b, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    top, left, height, width = (boxes[..., k].to(x.device).view(b, -1, 1, 1) for k in range(4))
    mask = ((rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)).any(1, keepdim=True)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(mask, noise, x)


def augment_batch(images, choices, augmentation, generator=None):
    """Decoded CHW uint8 images (any sizes, on one device) and their drawn choices -> the normalised batch."""
    x = resized_crops(images, choices['crop'], choices['interpolation'], augmentation.size)
    flip = choices['flip'].nonzero()[:, 0].to(x.device)
    x[flip] = x[flip].flip(-1)
    if augmentation.randaug is not None:
        fill = augmentation.randaug.ops[0].kwargs['fillcolor']
        x = randaugment(x, choices['ops'], choices['op_args'], choices['op_interpolation'], fill)
    mean = torch.tensor(augmentation.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(augmentation.std, device=x.device).view(1, -1, 1, 1)
    x = (x / 255 - mean) / std
    return erase(x, choices['erase'], generator) if augmentation.erase_count else x


def replace_unreadable(images):
    """Replace the None entries (unreadable files) by the batch's readable images, so the batch keeps its size."""
    readable = [image for image in images if image is not None]
    if not readable:
        raise UserError('no image of a whole training batch could be read: check the files under --data-path')
    return [image if image is not None else readable[i % len(readable)] for i, image in enumerate(images)]


class GpuTrainLoader:
    """Wraps a DataLoader of encoded batches: yields (normalised images, labels) on `device`.

    A background thread decodes and augments the next batches, on CUDA on its own stream, while the training
    step runs (the thread waits on the GPU and the loader queue, which release the GIL). Erasing noise comes
    from a generator seeded by a number each batch's first sample drew, so it leaves the training's random
    stream alone. On a CPU device (tests) the same runs without streams. Unreadable files go to `bad_images`
    (a BadImageCount, as on the CPU path: named once, counted per pass, the run stopped above its limit).
    """

    def __init__(self, loader, augmentation, device, prefetch=2, bad_images=None):
        self.loader, self.augmentation, self.prefetch, self.bad_images = loader, augmentation, prefetch, bad_images
        self.device = torch.device(device)
        self.cuda = self.device.type == 'cuda'
        if self.cuda and self.device.index is None:  # the thread sets its device by index
            self.device = torch.device('cuda', torch.cuda.current_device())

    def __len__(self):
        return len(self.loader)

    def prepare(self, batch, stream, generator):
        encoded, choices, targets, paths = batch
        with torch.cuda.stream(stream):  # no-op for stream None
            generator.manual_seed(int(choices['noise_seed'][0]))
            images, reasons = decode_batch(encoded, self.device)
            unreadable = [f'{paths[i]}: {reason}' for i, reason in sorted(reasons.items())]
            samples = augment_batch(replace_unreadable(images), choices, self.augmentation, generator)
            targets = targets.to(self.device, non_blocking=True)
            ready = stream.record_event() if self.cuda else None
        return samples, targets, ready, unreadable

    def __iter__(self):
        results = queue.Queue(self.prefetch)
        stop = threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def work():
            if self.cuda:
                torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device) if self.cuda else None
            generator = torch.Generator(self.device)
            try:
                for batch in self.loader:
                    if not put(self.prepare(batch, stream, generator)):
                        return
                put(None)
            except BaseException as err:  # handed to the training thread, which raises it
                put(err)

        thread = threading.Thread(target=work, daemon=True, name='gpu-input')
        thread.start()
        try:
            while (item := results.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                samples, targets, ready, unreadable = item
                if self.bad_images is not None:
                    self.bad_images.add(unreadable)
                if self.cuda:
                    consumer = torch.cuda.current_stream(self.device)
                    consumer.wait_event(ready)
                    # the consumer's stream now uses these tensors: keep the allocator from handing them out early
                    samples.record_stream(consumer)
                    targets.record_stream(consumer)
                yield samples, targets
            if self.bad_images is not None:
                self.bad_images.end_pass(self.loader.sampler)
        finally:  # also when the consumer stops early: the loader may be iterated again only after the thread ends
            stop.set()
            thread.join()


def encoded_dataset(dataset, name):
    """A training dataset of image files ((path, label) samples, torchvision's or timm's) as an
    EncodedImageDataset drawing the choices of its transform."""
    files = getattr(dataset, 'base', dataset)  # build_dataset's ImageSource wraps the file list
    samples = getattr(files, 'samples', None) or getattr(getattr(files, 'reader', None), 'samples', None)
    if samples is None or not len(samples) or not isinstance(samples[0][0], (str, os.PathLike)):  # e.g. tar members
        raise UserError(f'--input-pipeline gpu reads image files (--data-set IMNET, folder, INAT, INAT19), not '
                        f'--data-set {name}: use --input-pipeline cpu')
    return EncodedImageDataset(samples, TrainAugmentation(dataset.transform))
