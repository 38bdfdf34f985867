"""A distributed training sampler that can stop and resume anywhere, and gives each sample its own seed."""
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(base_seed, epoch, position):
    """Seed for the augmentation of the sample at global `position` of `epoch`.

    It depends neither on the rank nor on the data-loader worker, so the augmentations are the same
    for any number of processes or workers and after a resume.
    """
    return int(np.random.SeedSequence([base_seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


class ResumableSampler(Sampler):
    """Shuffles with a generator seeded by (seed, epoch), optionally repeats each index (repeated
    augmentation, as in DeiT) and gives process `rank` the positions rank, rank + W, rank + 2W, ...

    Every process gets the same number of samples: `dataset_len // num_replicas`, so a global batch of
    B x W samples is the same set as one process's batch of B x W. Yields `(index, seed)` pairs for
    SeededDataset. `set_epoch(epoch, start)` skips the first `start` samples of this process (resume).
    """

    def __init__(self, dataset_len, num_replicas=1, rank=0, shuffle=True, repeats=1, seed=0):
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.repeats = repeats
        self.seed = seed
        self.num_samples = dataset_len // num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch
        self.start = start

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        # Repeats of one image sit at consecutive positions, hence land on different processes
        # (or, with one process, in one batch with different augmentations).
        order = order.repeat_interleave(self.repeats)[:self.num_samples * self.num_replicas]
        for local in range(self.start, self.num_samples):
            position = self.rank + local * self.num_replicas
            yield int(order[position]), sample_seed(self.seed, self.epoch, position)

    def __len__(self):
        return self.num_samples - self.start


class SeededDataset(Dataset):
    """Wraps a dataset so that item `(index, seed)` is loaded and augmented under its own seed.

    The global random states (torch CPU, numpy, Python) are restored afterwards, so loading in the
    main process does not disturb the training's random stream.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
