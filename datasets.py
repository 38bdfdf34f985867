"""Datasets and their DeiT-style transforms: `build_dataset(is_train, args) -> (dataset, num_classes)`.

Image files (class folders, iNaturalist, tar files, timm's torch/ data sets, Hugging Face data sets) are read
through trainer.image_files.ImageSource: any format Pillow opens, converted to 8-bit RGB; an unreadable file is
replaced by another image and reported with the batch, so that the trainer counts and limits them
(--max-bad-images, --strict-images).
"""
import argparse
import contextlib
import functools
import importlib
import json
import os
import sys
from collections import Counter

import numpy as np
import torch
from timm.data import create_dataset, create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.readers.img_extensions import add_img_extensions
from torchvision import datasets, transforms

from trainer.image_files import IMAGE_EXTENSIONS, ImageSource, find_unreadable, is_image_file
from trainer.jpeg_draft import draft_for_random_crop
from trainer import UserError
from trainer.distributed import log

DATA_SETS = ('IMNET', 'folder', 'tar', 'CIFAR', 'CIFAR10', 'CIFAR100', 'INAT', 'INAT19', 'DIGITS')
# Map-style data sets named as in timm (its iterable ones, hfids/, tfds/, wds/, cannot be resumed mid-epoch):
# torch/ through timm's create_dataset, hfds/ through HuggingFaceImages.
TIMM_PREFIXES = ('torch/', 'hfds/')
DIGITS_NUM_TRAIN = 1437  # first 80% of scikit-learn's 1797 digits train, the rest validate


def data_set_name(name):
    """argparse type of --data-set: one of DATA_SETS or a timm name with one of TIMM_PREFIXES."""
    if name in DATA_SETS or (name.lower().startswith(TIMM_PREFIXES) and '/' in name.rstrip('/')):
        return name
    raise argparse.ArgumentTypeError(f'unknown --data-set {name}: choose one of {", ".join(DATA_SETS)}, or a timm '
                                     f'data set name starting with {" or ".join(TIMM_PREFIXES)} (e.g. torch/mnist, '
                                     f'hfds/timm/mini-imagenet)')


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder of raw items (path, class) that names empty class folders instead of failing obscurely;
    image files are recognised by extension or content (trainer.image_files.is_image_file)."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise UserError(f'data folder {root} does not exist: --data-path must hold train/ and val/, '
                            f'each with one sub-folder of images per class')
        self.ignored = []
        try:
            super().__init__(root, loader=str, is_valid_file=self._take, allow_empty=True)
        except FileNotFoundError as err:  # no class folders at all
            raise UserError(f'{root}: {err}: put the images of each class in their own sub-folder') from None
        counts = Counter(self.targets)
        empty = [name for name, i in self.class_to_idx.items() if counts[i] == 0]
        if empty:
            shown = ', '.join(empty[:5]) + (f' and {len(empty) - 5} more' if len(empty) > 5 else '')
            raise UserError(f'class folder(s) {shown} in {root} hold no images (any format Pillow reads): '
                            f'add images or remove the folder(s)')
        if self.ignored:
            log(f'{root}: ignored {len(self.ignored)} file(s) that are not images, e.g. {self.ignored[0]}')

    def _take(self, path):
        if is_image_file(path):
            return True
        self.ignored.append(path)
        return False


class INatDataset(torch.utils.data.Dataset):
    """iNaturalist 2018/2019 in its release layout: `train{year}.json`, `val{year}.json` (COCO style:
    `images` with `file_name`, `annotations` with `category_id`) and the image tree they point into.
    Classes are the species (`category_id`s of the training annotations, in sorted order). Items are
    raw (path, class), to be decoded by trainer.image_files.ImageSource.
    """

    def __init__(self, root, train, year):
        self.root = root
        train_json = read_json(os.path.join(root, f'train{year}.json'))
        split_json = train_json if train else read_json(os.path.join(root, f'val{year}.json'))
        categories = sorted({a['category_id'] for a in train_json['annotations']})
        index_of = {c: i for i, c in enumerate(categories)}
        self.num_classes = len(categories)
        file_of = {im['id']: im['file_name'] for im in split_json['images']}
        self.samples = [(os.path.join(root, file_of[a['image_id']]), index_of[a['category_id']])
                        for a in split_json['annotations']]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def read_json(path):
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist: --data-path must be the iNaturalist folder holding the '
                        f'train/val JSON files')
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def hugging_face_datasets():
    """Hugging Face's `datasets` package, which is sys.modules['datasets'] within the block.

    This module's name shadows the package: run from the repository root, `import datasets` finds this file.
    The package is imported (once) with the root off sys.path, and holds the name while the block loads
    data (it imports its own modules lazily by that name); then this module gets the name back, for the
    trainer's imports and for pickles of its objects."""
    package = _import_hugging_face_datasets()
    trainer_module = sys.modules.get('datasets')
    sys.modules['datasets'] = package
    try:
        yield package
    finally:
        if trainer_module is not None:
            sys.modules['datasets'] = trainer_module


@functools.cache
def _import_hugging_face_datasets():
    shadow, path = sys.modules.pop('datasets', None), sys.path[:]
    root = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in path if os.path.realpath(p or os.curdir) != root]
    try:
        return importlib.import_module('datasets')
    except ModuleNotFoundError as err:
        if err.name != 'datasets':
            raise
        raise UserError('--data-set hfds/NAME needs the Hugging Face datasets package: pip install datasets') from None
    finally:
        sys.path[:] = path
        if shadow is not None:
            sys.modules['datasets'] = shadow


class HuggingFaceImages(torch.utils.data.Dataset):
    """A split of a Hugging Face data set, e.g. a Hub name or a local folder that `datasets.load_dataset`
    reads (class folders of images, parquet files), with an image column and a class-label column (`columns`,
    timm's names by default). Items are raw (bytes or path, class), to be decoded by
    trainer.image_files.ImageSource. `cache_dir` holds the downloaded and prepared files.
    """

    def __init__(self, name, split, cache_dir, columns=('image', 'label')):
        self.name, self.split, self.cache_dir, self.columns = name, split, cache_dir, columns
        image_key, label_key = columns
        with hugging_face_datasets() as hf:
            try:
                data = hf.load_dataset(name, split=split, cache_dir=cache_dir)
            except ValueError as err:  # e.g. no such split, its message lists those there are
                raise UserError(f'--data-set hfds/{name}: {str(err).rstrip(".")}: name the splits with '
                                f'--train-split and --val-split') from None
            except OSError as err:  # not found locally or on the Hub, no connection
                raise UserError(f'--data-set hfds/{name}: {err}') from None
            label = data.features.get(label_key)
            if image_key not in data.features or not isinstance(label, hf.ClassLabel):
                raise UserError(f'--data-set hfds/{name} has the columns {", ".join(data.features)}: the trainer '
                                f'reads the images from "{image_key}" (--input-key) and the classes from the '
                                f'class-label column "{label_key}" (--target-key)')
            self.classes = label.names
            self.data = data.cast_column(image_key, hf.Image(decode=False))  # {'bytes', 'path'}, decoded by us

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        item = self.data[index]
        image_key, label_key = self.columns
        return item[image_key]['bytes'] or item[image_key]['path'], item[label_key]

    def filename(self, index):
        image = self.data[index][self.columns[0]]
        if not image['bytes']:
            return image['path']
        return f'hfds/{self.name} {self.split} item {index}' + (f' ({image["path"]})' if image['path'] else '')

    def __reduce__(self):
        # Spawned loader workers import `datasets` as this module; the HF data set is reopened from the cache.
        return HuggingFaceImages, (self.name, self.split, self.cache_dir, self.columns)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes), upsampled to `size` pixels.

    Built in, no download: the first 1437 images train, the last 360 (other writers) validate.
    Images are upsampled once, then augmented per sample by small random affine moves (no flips:
    a mirrored digit is another glyph). Without scikit-learn, `<data_path>/digits.npz` (written by
    `python datasets.py --export-digits PATH`) is read instead.
    """

    def __init__(self, train, size, data_path):
        images, targets = load_digits_arrays(data_path)
        images = torch.tensor(images, dtype=torch.float32) / 16.0
        split = slice(0, DIGITS_NUM_TRAIN) if train else slice(DIGITS_NUM_TRAIN, None)
        images = torch.nn.functional.interpolate(images[split, None], size=(size, size), mode='bilinear',
                                                 align_corners=False)
        self.images = (images - 0.5) / 0.5  # one channel; made RGB per item, 3x less memory at 224 px
        self.targets = torch.tensor(targets)[split]
        self.transform = transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1),
                                                 fill=-1.0) if train else None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index]
        image = self.transform(image) if self.transform else image
        return image.expand(3, -1, -1), int(self.targets[index])


def load_digits_arrays(data_path):
    """(images (1797, 8, 8) with values 0..16, targets (1797,)) from scikit-learn or a digits.npz export."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        path = os.path.join(data_path, 'digits.npz')
        if not os.path.isfile(path):
            raise UserError(f'--data-set DIGITS needs scikit-learn (pip install scikit-learn) or {path}, written '
                            f'where scikit-learn is installed by: python datasets.py --export-digits {path}') from None
        with np.load(path) as arrays:
            return arrays['images'], arrays['targets']
    digits = load_digits()
    return digits.images, digits.target


def build_dataset(is_train, args):
    """Return (dataset, number of classes) for args.data_set."""
    name, root = args.data_set, args.data_path
    if name == 'DIGITS':
        return DigitsDataset(is_train, args.input_size, root), 10
    transform = build_transform(is_train, args)
    if name in ('CIFAR', 'CIFAR10', 'CIFAR100'):
        cifar = datasets.CIFAR10 if name == 'CIFAR10' else datasets.CIFAR100
        try:
            dataset = cifar(root, train=is_train, transform=transform, download=args.download)
        except RuntimeError as err:
            raise UserError(f'{name} at {root}: {err} (add --download to fetch it)') from None
        return dataset, len(dataset.classes)
    base, num_classes = raw_image_dataset(name, root, is_train, args.train_split if is_train else args.val_split,
                                          getattr(args, 'download', False), (args.input_key, args.target_key))
    draft = draft_for_random_crop(transform) if is_train else None  # JPEGs decoded at the scale the crop needs
    return ImageSource(base, transform, prepare=draft), num_classes


def raw_image_dataset(name, root, is_train, timm_split, download=False, hf_columns=('image', 'label')):
    """(data set of raw (path, bytes or PIL image; class) items, number of classes); `timm_split` names the
    split of a data set with one of TIMM_PREFIXES, `hf_columns` the image and class columns of an hfds/ one.

    Class folders (IMNET, folder) stay on torchvision's ImageFolder rather than timm's folder reader,
    which takes images by extension only, names classes by leaf folder (nested folders become extra
    classes) and drops empty class folders (shifting the class indices between train/ and val/).
    """
    split = 'train' if is_train else 'val'
    if name in ('IMNET', 'folder'):
        folder = CheckedImageFolder(os.path.join(root, split))
        return folder, len(folder.classes)
    if name in ('INAT', 'INAT19'):
        dataset = INatDataset(root, is_train, 2018 if name == 'INAT' else 2019)
        return dataset, dataset.num_classes
    if name == 'tar':
        train = tar_dataset(os.path.join(root, 'train.tar'))
        dataset = train if is_train else tar_dataset(os.path.join(root, 'val.tar'), train)
        return dataset, len(train.reader.class_name_to_idx)
    if name.lower().startswith('hfds/'):
        dataset = HuggingFaceImages(name.partition('/')[2], timm_split, root, hf_columns)
        return dataset, len(dataset.classes)
    # torch/NAME: timm's create_dataset; input_img_mode None leaves any decoding to ImageSource
    try:
        dataset = create_dataset(name, root=root, split=timm_split, is_training=is_train, download=download,
                                 input_img_mode=None)
    except (ImportError, AssertionError, OSError, ValueError) as err:
        raise UserError(f'--data-set {name} at {root}: {err}') from None
    classes = getattr(getattr(dataset, 'reader', dataset), 'class_to_idx', None) or getattr(dataset, 'classes', None)
    if not classes:
        raise UserError(f'--data-set {name}: timm reports no class labels for it; use a classification data set')
    return dataset, len(classes)


@functools.lru_cache(maxsize=2)
def tar_dataset(path, classes_of=None):
    """timm's data set over a tar of <class>/<image> files, items (bytes, class); `classes_of` another
    tar data set whose class indices to use (val takes train's)."""
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist: --data-set tar reads train.tar and val.tar in --data-path, '
                        f'each holding <class>/<image> files')
    add_img_extensions(sorted(IMAGE_EXTENSIONS))  # timm's tar reader takes files by extension
    class_map = dict(classes_of.reader.class_name_to_idx) if classes_of is not None else ''
    return create_dataset('', root=path, load_bytes=True, class_map=class_map)


def verify_images(args):
    """--verify-images: decode every image of the validation and training sets; raise UserError naming
    the count when some cannot be read (each is printed)."""
    total, unreadable = 0, []
    for is_train in (False, True):
        dataset, _ = build_dataset(is_train, args)
        if not isinstance(dataset, ImageSource):
            log(f'--data-set {args.data_set} has no image files to verify')
            return
        split = 'train' if is_train else 'val'
        found = find_unreadable(dataset, f'verifying {split}', args.num_workers)
        for line in found:
            print(f'unreadable: {line}', flush=True)
        total, unreadable = total + len(dataset), unreadable + found
    if unreadable:
        raise UserError(f'{len(unreadable)} of {total} images cannot be read (listed above): fix or delete them, '
                        f'or let training skip them (at most --max-bad-images per epoch)')
    log(f'all {total} images are readable')


def check_class_sets(train, val):
    """Labels are class indices, so train and val must hold the same classes: a class missing from val or
    an extra one there shifts the labels of all classes after it (or changes the head)."""
    train_classes, val_classes = getattr(train, 'classes', None), getattr(val, 'classes', None)
    if train_classes is None or val_classes is None or list(train_classes) == list(val_classes):
        return
    differences = []
    for label, names in (('missing from val', set(train_classes) - set(val_classes)),
                         ('only in val', set(val_classes) - set(train_classes))):
        if names:
            names = sorted(names)
            differences.append(f'{label}: {", ".join(names[:5])}' + (f' and {len(names) - 5} more' if len(names) > 5
                                                                     else ''))
    raise UserError(f'the training set has {len(train_classes)} classes and the validation set {len(val_classes)}, '
                    f'not the same ({"; ".join(differences)}): give train/ and val/ one folder for each class, '
                    f'with the same names')


def build_transform(is_train, args):
    """DeiT's transforms: timm's RandAugment/erasing pipeline for training, resize + centre crop for eval."""
    if is_train:
        transform = create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=args.aa if args.aa and args.aa != 'none' else None,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount)
        if args.input_size <= 32:  # tiny images: pad-and-crop instead of a random resized crop
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4, pad_if_needed=True)
        use_own_posterize(transform)
        return transform
    return transforms.Compose([
        transforms.Resize(int(args.input_size / args.eval_crop_ratio),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def posterize(image, bits, **_):
    """Keep the `bits` high bits of each channel; 0 bits gives a black image.

    timm's RandAugment asks for 0 bits (PosterizeIncreasing at magnitude 10, which the magnitude noise
    of rand-m9-mstd0.5 reaches once in ~40 draws; Posterize at magnitude < 2.5). Pillow before 13
    returned black for it, Pillow 13 raises ValueError; this keeps the older result on every version.
    """
    if bits >= 8:
        return image
    mask = 0 if bits <= 0 else 256 - 2 ** (8 - bits)
    return image.point([i & mask for i in range(256)] * len(image.getbands()))


def use_own_posterize(transform):
    """Point the posterize ops of the (Rand/Auto)Augment stages of a timm transform at `posterize`."""
    for stage in getattr(transform, 'transforms', ()):
        ops = getattr(stage, 'ops', None) or [op for ops in getattr(stage, 'policy', ()) for op in ops]
        for op in ops:
            if isinstance(op, AugmentOp) and op.name.startswith('Posterize'):
                op.aug_fn = posterize


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Export the DIGITS data for machines without scikit-learn.')
    parser.add_argument('--export-digits', required=True, metavar='PATH', help='where to write digits.npz')
    path = parser.parse_args().export_digits
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images, targets = load_digits_arrays('')
    np.savez_compressed(path, images=images.astype(np.uint8), targets=targets.astype(np.int64))
    print(f'wrote {path}')
