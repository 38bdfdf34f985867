"""Datasets and their DeiT-style transforms: `build_dataset(is_train, args) -> (dataset, num_classes)`.

Unreadable images: a corrupt or truncated file stops the run with an error naming the file, instead
of being skipped: skipping would silently change the data and, with several loader workers, could not
be counted reliably. Replace or delete the file and rerun; training resumes from the last checkpoint.
"""
import json
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from trainer import UserError

DATA_SETS = ('IMNET', 'folder', 'CIFAR', 'CIFAR10', 'CIFAR100', 'INAT', 'INAT19', 'DIGITS')
DIGITS_NUM_TRAIN = 1437  # first 80% of scikit-learn's 1797 digits train, the rest validate


def load_image(path):
    try:
        with open(path, 'rb') as f:
            image = Image.open(f)
            return image.convert('RGB')
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise UserError(f'cannot read image {path} ({err}): delete or replace this file and rerun '
                        f'(training resumes from the last checkpoint)') from None


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder that names empty class folders and unreadable images instead of failing obscurely."""

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise UserError(f'data folder {root} does not exist: --data-path must hold train/ and val/, '
                            f'each with one sub-folder of images per class')
        try:
            super().__init__(root, transform=transform, loader=load_image, allow_empty=True)
        except FileNotFoundError as err:  # no class folders at all
            raise UserError(f'{root}: {err}: put the images of each class in their own sub-folder') from None
        counts = Counter(self.targets)
        empty = [name for name, i in self.class_to_idx.items() if counts[i] == 0]
        if empty:
            shown = ', '.join(empty[:5]) + (f' and {len(empty) - 5} more' if len(empty) > 5 else '')
            raise UserError(f'class folder(s) {shown} in {root} hold no images ({", ".join(IMG_EXTENSIONS)}): '
                            f'add images or remove the folder(s)')

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except (ValueError, RuntimeError) as err:  # a transform that this image cannot take, e.g. a crop larger than it
            raise UserError(f'cannot use image {self.samples[index][0]} ({err}): replace or delete this file and '
                            f'rerun') from None


class INatDataset(torch.utils.data.Dataset):
    """iNaturalist 2018/2019 in its release layout: `train{year}.json`, `val{year}.json` (COCO style:
    `images` with `file_name`, `annotations` with `category_id`) and the image tree they point into.
    Classes are the species (`category_id`s of the training annotations, in sorted order).
    """

    def __init__(self, root, train, year, transform=None):
        self.root, self.transform = root, transform
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
        path, target = self.samples[index]
        image = load_image(path)
        return (self.transform(image) if self.transform else image), target


def read_json(path):
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist: --data-path must be the iNaturalist folder holding the '
                        f'train/val JSON files')
    with open(path) as f:
        return json.load(f)


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
    if name in ('INAT', 'INAT19'):
        dataset = INatDataset(root, is_train, 2018 if name == 'INAT' else 2019, transform)
        return dataset, dataset.num_classes
    if name in ('IMNET', 'folder'):
        dataset = CheckedImageFolder(os.path.join(root, 'train' if is_train else 'val'), transform)
        return dataset, len(dataset.classes)
    raise UserError(f'unknown --data-set {name}: choose one of {", ".join(DATA_SETS)}')


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
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        return transform
    return transforms.Compose([
        transforms.Resize(int(args.input_size / args.eval_crop_ratio),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description='Export the DIGITS data for machines without scikit-learn.')
    parser.add_argument('--export-digits', required=True, metavar='PATH', help='where to write digits.npz')
    path = parser.parse_args().export_digits
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images, targets = load_digits_arrays('')
    np.savez_compressed(path, images=images.astype(np.uint8), targets=targets.astype(np.int64))
    print(f'wrote {path}')
