"""Image files as the trainer reads them: which files are images, decoding any of them to 8-bit RGB,
and the accounting of files that cannot be read.

Which files: every file whose extension is one Pillow opens (.jpg, .png, .gif, .webp, .tif, .bmp, ...);
a file with any other extension (or none) is taken when Pillow recognises its content. Hidden files
(names starting with '.', e.g. macOS `._x.jpg` resource forks) are ignored.

Decoding (`to_rgb`): the first frame of animated files; 16-bit images (modes I;16*, and I, which holds
16-bit PNGs in older Pillow) scaled by 255/65535; float images (F) scaled by 255 when all values lie in
[0, 1], else taken as 0..255; values outside the range clipped. Transparency (RGBA, LA, PA, and palette
or grey images with a transparent colour) is composited on white, as image viewers show it; CMYK,
YCbCr, palette and 1-bit images go through Pillow's conversion.

Unreadable files (corrupt, truncated, empty, not an image): `decode` raises BadImage; the data sets
substitute another image (the batch keeps its shape) and report the file with the sample, and
`BadImageCount` counts, names and limits them in the main process.
"""
import io
import os

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import DataLoader, default_collate

from trainer import UserError
from trainer.distributed import get_world_size, is_dist_avail_and_initialized, log

BACKGROUND = (255, 255, 255)  # what transparent pixels become
MAX_SUBSTITUTE_TRIES = 20  # consecutive unreadable files before a data set is declared broken


class BadImage(Exception):
    """A file that cannot be decoded to an image; the message says why."""


def _image_extensions():
    Image.init()
    stubs = {name for name, (factory, _) in Image.OPEN.items()
             if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)}
    # stub formats (MPEG, HDF5, GRIB, ...) need handlers Pillow does not ship: not taken by extension
    return frozenset(ext for ext, name in Image.registered_extensions().items()
                     if name in Image.OPEN and name not in stubs)


IMAGE_EXTENSIONS = _image_extensions()


def is_image_file(path):
    """True for a non-hidden file with an image extension, or whose content Pillow recognises."""
    if os.path.basename(path).startswith('.'):
        return False
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with Image.open(path):  # reads the header only
            return True
    except Exception:  # noqa: BLE001 (any failure to identify means: not an image)
        return False


def decode(source, prepare=None):
    """An 8-bit RGB image from a path, bytes, a file object or a (lazily opened) PIL image; BadImage if
    the data cannot be decoded; `prepare(image)` runs between opening and decoding (JPEG draft mode).
    Pillow raises many exception types on damaged data (OSError, SyntaxError,
    ValueError, struct.error, DecompressionBombError...), so all are turned into BadImage here."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, 'rb') as f:  # read whole: a multi-frame image would keep a file open
                source = f.read()
        image = source if isinstance(source, Image.Image) else Image.open(
            io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        if prepare is not None:
            prepare(image)
        image.load()
    except Exception as err:  # noqa: BLE001
        raise as_bad_image(err) from None
    return to_rgb(image)


def as_bad_image(err):
    """The BadImage saying why reading or decoding an image raised err."""
    if isinstance(err, BadImage):
        return err
    if isinstance(err, UnidentifiedImageError):  # its message names a BytesIO
        return BadImage('not an image in a format Pillow reads')
    return BadImage(f'{type(err).__name__}: {err}' if str(err) else type(err).__name__)


def to_rgb(image):
    """8-bit RGB of an image of any Pillow mode (the scaling rules are in the module docstring)."""
    if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):
        image = _grey8(np.asarray(image, dtype=np.float64) * (255 / 65535))
    elif image.mode == 'F':
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        in_unit_range = finite.size and finite.min() >= 0 and finite.max() <= 1
        image = _grey8(np.nan_to_num(values) * (255 if in_unit_range else 1))
    if image.mode == 'P' or (image.mode in ('L', 'RGB') and 'transparency' in image.info):
        image = image.convert('RGBA')  # the transparent colour becomes alpha 0
    if image.mode in ('RGBA', 'LA', 'PA', 'RGBa'):
        rgba = image if image.mode == 'RGBA' else image.convert('RGBA')
        background = Image.new('RGB', image.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel('A'))
        return background
    return image if image.mode == 'RGB' else image.convert('RGB')


def _grey8(values):
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), 'L')


class ImageSource(torch.utils.data.Dataset):
    """A data set whose items are `(image, target, unreadable)`: the image decoded by `decode` from the
    raw item of `base` (a path, bytes or PIL image), transformed; `unreadable` a tuple of
    'file: reason' lines for the files that failed (empty when the image was read). Item i's file is named
    by `base.filename(i)` where it exists, else by the path of `base.samples[i]` (class folders, iNaturalist).

    An unreadable file is replaced by the next readable item of `base` (in a class folder mostly one of
    the same class, as files are sorted) with that item's class: batches keep their shape, and the
    choice depends only on the index, so runs stay deterministic and resume exactly.
    """

    def __init__(self, base, transform=None, prepare=None):
        self.base, self.transform, self.prepare = base, transform, prepare

    @property
    def classes(self):
        """The class names of `base` where it has them (class folders), for checking train against val."""
        return getattr(self.base, 'classes', None)

    def name_of(self, index):
        if hasattr(self.base, 'filename'):
            return self.base.filename(index)
        samples = getattr(self.base, 'samples', None)
        return samples[index][0] if samples is not None else f'item {index}'

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        unreadable = []
        for attempt in range(MAX_SUBSTITUTE_TRIES):
            item = (index + attempt) % len(self.base)
            source, target = self.base[item][:2]
            try:
                image = decode(source, self.prepare)
            except BadImage as err:
                unreadable.append(f'{self.name_of(item)}: {err}')
                continue
            try:
                image = self.transform(image) if self.transform else image
            except (ValueError, RuntimeError) as err:  # a transform this image cannot take, e.g. a crop larger than it
                raise UserError(f'cannot use image {self.name_of(item)} ({err}): replace or delete this file and '
                                f'rerun') from None
            return image, target, tuple(unreadable)
        raise UserError(f'{MAX_SUBSTITUTE_TRIES} consecutive files cannot be read, the last: {unreadable[-1]}; '
                        f'check the data set (python main.py --verify-images lists every unreadable file)')

    def check(self, index):
        """'' if item `index` decodes, else 'path: reason' (for --verify-images)."""
        try:
            decode(self.base[index][0])
        except BadImage as err:
            return f'{self.name_of(index)}: {err}'
        return ''


def collate(batch):
    """default_collate for (image, target) items; items of an ImageSource add, as a third element, the
    list of each item's unreadable files."""
    if len(batch[0]) == 2:
        return default_collate(batch)
    images, targets, unreadable = zip(*batch)
    return default_collate(images), default_collate(targets), list(unreadable)


class BadImageCount:
    """Counts the unreadable files met by a loader's batches, names each once in the log, and stops the
    run when one epoch (or an evaluation) meets more than `limit` distinct ones: on each process as
    they come, and over all processes at `end_epoch`. `purpose` ('training', 'validation' within a
    training run, or 'evaluation' alone) words the messages."""

    def __init__(self, limit, purpose):
        self.limit, self.purpose = limit, purpose
        self.named = set()
        self.epoch = set()

    def add(self, lines):
        for line in lines:
            if line not in self.named:
                self.named.add(line)
                print(f'skipped unreadable image {line}', flush=True)  # on every process: each meets its own
            self.epoch.add(line)
        if len(self.epoch) > self.limit:
            self._stop(self.epoch)

    def end_epoch(self, label):
        """Log the epoch's count (all processes together) and start a new count; returns the count."""
        lines = [self.epoch]
        if is_dist_avail_and_initialized():
            lines = [None] * get_world_size()
            torch.distributed.all_gather_object(lines, self.epoch)
        unreadable = set().union(*lines)
        self.epoch = set()
        if unreadable:
            log(f'{label}: {len(unreadable)} unreadable image(s) skipped, each replaced by another image')
        if len(unreadable) > self.limit:
            self._stop(unreadable)
        return len(unreadable)

    def end_pass(self, sampler):
        """`end_epoch` after a loader's complete pass, labelled by its sampler's epoch where it has one."""
        epoch = getattr(sampler, 'epoch', None)
        return self.end_epoch(self.purpose if epoch is None else f'epoch {epoch}')

    def _stop(self, unreadable):
        if self.purpose == 'evaluation':
            fix = 'fix or delete them and rerun the evaluation'
        else:
            fix = 'fix or delete them and rerun (training resumes from the last checkpoint)'
        what = 'the run stops at the first one (--strict-images)' if self.limit == 0 else (
            f'more than --max-bad-images {self.limit}')
        raise UserError(f'{len(unreadable)} unreadable image(s) in {self.purpose}, {what}; e.g. {min(unreadable)}: '
                        f'{fix}; python main.py --verify-images lists them all')


class CountingLoader(DataLoader):
    """DataLoader whose batches are (images, targets); the unreadable files that ImageSource items
    report go to `bad_images` (a BadImageCount) in the main process, so counts are right with any
    number of workers, and each complete pass ends the count's epoch (on every process alike, as
    each runs its loader to the end). Evaluation batches drop the substituted items, so that accuracy
    counts each readable test image once."""

    def __init__(self, dataset, bad_images, drop_substitutes=False, **kwargs):
        super().__init__(dataset, collate_fn=collate, **kwargs)
        self.bad_images, self.drop_substitutes = bad_images, drop_substitutes

    def __iter__(self):
        for batch in super().__iter__():
            if len(batch) == 2:
                yield batch
                continue
            images, targets, unreadable = batch
            self.bad_images.add([line for lines in unreadable for line in lines])
            if self.drop_substitutes:
                read = torch.tensor([not lines for lines in unreadable])
                if not read.all():
                    images, targets = images[read], targets[read]
                if not len(targets):
                    continue
            yield images, targets
        self.bad_images.end_pass(self.sampler)


class _Checks(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.source.check(index)


def _progress(total, label):
    """tqdm when installed, else a progress line rewritten in place."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=label, unit='img')
    except ImportError:
        return _ProgressLine(total, label)


class _ProgressLine:
    def __init__(self, total, label):
        self.total, self.label, self.done = total, label, 0

    def update(self, count):
        self.done += count
        print(f'\r{self.label}: {self.done}/{self.total}', end='' if self.done < self.total else '\n', flush=True)

    def close(self):
        pass


def find_unreadable(source, label, num_workers, batch_size=64):
    """Decode every file of an ImageSource with `num_workers` loader processes, showing progress;
    return the 'file: reason' lines of the unreadable ones."""
    loader = DataLoader(_Checks(source), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    bar = _progress(len(source), label)
    unreadable = []
    for results in loader:
        unreadable += [line for line in results if line]
        bar.update(len(results))
    bar.close()
    return unreadable
