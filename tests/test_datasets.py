"""Datasets, the resumable sampler, SLURM host parsing and the distillation loss."""
import argparse
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets import DIGITS_NUM_TRAIN, INatDataset, build_dataset
from trainer.image_files import ImageSource
from trainer import UserError
from trainer.distributed import first_slurm_host
from trainer.losses import DistillationLoss
from trainer.samplers import ResumableSampler, SeededDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_args(size=16, data_path='data'):
    return argparse.Namespace(data_set='DIGITS', data_path=data_path, input_size=size)


def test_digits_split_is_fixed_and_upsampled():
    from sklearn.datasets import load_digits
    train, classes = build_dataset(True, digits_args())
    val, _ = build_dataset(False, digits_args())
    assert classes == 10 and len(train) == DIGITS_NUM_TRAIN and len(train) + len(val) == 1797
    assert val.targets.tolist() == load_digits().target[DIGITS_NUM_TRAIN:].tolist()
    image, target = val[0]
    assert image.shape == (3, 16, 16) and target == load_digits().target[DIGITS_NUM_TRAIN]
    # Averaging 2x2 blocks of the 2x (bilinear, hence blurred) upsampling nearly gives the scan back.
    scan = torch.tensor(load_digits().images[DIGITS_NUM_TRAIN], dtype=torch.float32) / 8 - 1
    pooled = F.avg_pool2d(image[:1], 2)[0]
    assert torch.corrcoef(torch.stack([pooled.flatten(), scan.flatten()]))[0, 1] > 0.95
    assert torch.equal(image[0], image[2])  # grey
    # Validation images are not augmented; training images are, differently per seed.
    assert torch.equal(val[0][0], val[0][0])
    seeded = SeededDataset(train)
    assert torch.equal(seeded[(0, 1)][0], seeded[(0, 1)][0])
    assert not torch.equal(seeded[(0, 1)][0], seeded[(0, 2)][0])


def test_digits_without_scikit_learn(tmp_path, monkeypatch):
    path = tmp_path / 'digits.npz'
    subprocess.run([sys.executable, 'datasets.py', '--export-digits', str(path)], cwd=REPO, check=True,
                   capture_output=True)
    with_sklearn, _ = build_dataset(False, digits_args())
    monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)  # import now fails
    with pytest.raises(UserError, match='needs scikit-learn'):
        build_dataset(False, digits_args(data_path=str(tmp_path / 'elsewhere')))
    from_file, _ = build_dataset(False, digits_args(data_path=str(tmp_path)))
    assert torch.equal(from_file.images, with_sklearn.images)
    assert torch.equal(from_file.targets, with_sklearn.targets)


def test_cifar_is_downloaded_only_when_asked(tmp_path):
    args = argparse.Namespace(data_set='CIFAR10', data_path=str(tmp_path), input_size=32, download=False,
                              eval_crop_ratio=0.875)
    with pytest.raises(UserError, match='CIFAR10 at .*add --download to fetch it'):
        build_dataset(False, args)
    assert os.listdir(tmp_path) == []


def test_inaturalist_layout(tmp_path):
    # Two species (ids 7 and 3) -> classes 0 (id 3) and 1 (id 7), in sorted id order.
    os.makedirs(tmp_path / 'img')
    for name in ('a', 'b', 'c'):
        Image.new('RGB', (8, 8), (10, 20, 30)).save(tmp_path / 'img' / f'{name}.jpg')
    train = {'images': [{'id': 1, 'file_name': 'img/a.jpg'}, {'id': 2, 'file_name': 'img/b.jpg'}],
             'annotations': [{'image_id': 1, 'category_id': 7}, {'image_id': 2, 'category_id': 3}]}
    val = {'images': [{'id': 5, 'file_name': 'img/c.jpg'}], 'annotations': [{'image_id': 5, 'category_id': 7}]}
    for name, content in (('train2019.json', train), ('val2019.json', val)):
        (tmp_path / name).write_text(json.dumps(content))
    dataset = INatDataset(str(tmp_path), train=True, year=2019)
    assert dataset.num_classes == 2
    assert [(os.path.basename(p), t) for p, t in dataset.samples] == [('a.jpg', 1), ('b.jpg', 0)]
    image, target, unreadable = ImageSource(INatDataset(str(tmp_path), train=False, year=2019))[0]
    assert image.size == (8, 8) and target == 1 and unreadable == ()
    with pytest.raises(UserError, match='train2018.json does not exist'):
        INatDataset(str(tmp_path), train=True, year=2018)


def batches(sampler, batch_size):
    items = list(sampler)
    return [items[i:i + batch_size] for i in range(0, len(items) - batch_size + 1, batch_size)]


@pytest.mark.parametrize('repeats', [1, 3])
def test_sampler_global_batches_do_not_depend_on_the_process_count(repeats):
    single = ResumableSampler(50, num_replicas=1, rank=0, repeats=repeats, seed=3)
    ranks = [ResumableSampler(50, num_replicas=2, rank=r, repeats=repeats, seed=3) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(4)
    one = batches(single, 8)
    two = list(zip(*(batches(r, 4) for r in ranks)))
    assert len(one) == len(two) == 6
    for a, (b0, b1) in zip(one, two):
        assert sorted(a) == sorted(b0 + b1)  # same (index, seed) pairs


def test_sampler_order_repeats_and_resume():
    sampler = ResumableSampler(10, repeats=3, seed=0)
    sampler.set_epoch(1)
    items = list(sampler)
    indices = [i for i, _ in items]
    assert len(items) == len(sampler) == 10
    assert indices[0] == indices[1] == indices[2] != indices[3]  # repeats sit together
    assert len({seed for _, seed in items}) == 10  # ... and are augmented differently
    sampler.set_epoch(1, start=4)
    assert list(sampler) == items[4:] and len(sampler) == 6
    sampler.set_epoch(2)
    assert [i for i, _ in sampler] != indices  # a new order each epoch

    plain = ResumableSampler(10, shuffle=True, seed=0)
    plain.set_epoch(0)
    assert sorted(i for i, _ in plain) == list(range(10))  # a permutation


def test_seeded_dataset_keeps_the_global_random_state():
    class RandomItem(torch.utils.data.Dataset):
        def __getitem__(self, index):
            return torch.rand(1).item(), random.random(), np.random.rand()

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = torch.rand(1).item(), random.random(), np.random.rand()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    dataset = SeededDataset(RandomItem())
    first = dataset[(0, 11)]
    assert dataset[(5, 11)] == first and dataset[(0, 12)] != first
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected


@pytest.mark.parametrize('nodelist, host', [
    ('gpu17', 'gpu17'), ('gpu[07-09,12]', 'gpu07'), ('node[3,5],cpu1', 'node3'), ('a-b-c,d', 'a-b-c'),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_distillation_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    base = torch.nn.CrossEntropyLoss()
    teacher_logits = torch.randn(4, 5)
    teacher = lambda inputs: teacher_logits  # noqa: E731
    assert DistillationLoss(base, None)(None, logits, targets) == base(logits, targets)
    # soft: identical student and teacher -> no distillation term
    same = DistillationLoss(base, lambda inputs: logits, 'soft', alpha=0.3, tau=2.0)(None, logits, targets)
    assert same == pytest.approx(0.7 * base(logits, targets).item())
    # soft, by hand: tau^2 * sum p_t (log p_t - log p_s) / (batch * classes)
    tau = 2.0
    p_t = torch.softmax(teacher_logits / tau, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits / tau, 1))).sum() * tau ** 2 / logits.numel()
    soft = DistillationLoss(base, teacher, 'soft', alpha=0.5, tau=tau)(None, logits, targets)
    assert soft == pytest.approx(0.5 * base(logits, targets).item() + 0.5 * kl.item(), rel=1e-5)
    # hard: cross-entropy against the teacher's argmax; a (class, distillation) tuple uses the second
    hard = DistillationLoss(base, teacher, 'hard', alpha=1.0)(None, (torch.zeros(4, 5), logits), targets)
    assert hard == pytest.approx(F.cross_entropy(logits, teacher_logits.argmax(1)).item())
