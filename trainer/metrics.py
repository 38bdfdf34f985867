"""Averaged training metrics and the progress line with an ETA."""
import datetime
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from trainer.distributed import is_dist_avail_and_initialized, log


class SmoothedValue:
    """A series of values: windowed median/average for progress lines, global average for the epoch."""

    def __init__(self, window_size=20, fmt='{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device):
        """Sum count and total over processes so global_avg covers every process's samples."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return sum(self.deque) / len(self.deque)

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value,
                               total=self.total)


class MetricLogger:
    """Named meters plus a progress/ETA line every `print_freq` iterations.

    Values passed to update() must already be Python numbers: the caller decides when to pay for a
    device sync, the logger never synchronises.
    """

    def __init__(self, delimiter='  '):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n=1, **values):
        for name, value in values.items():
            self.meters[name].update(value, n=n)

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items() if meter.count)

    def synchronize_between_processes(self, device):
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def global_averages(self):
        return {name: meter.global_avg for name, meter in self.meters.items() if meter.count}

    def log_every(self, iterable, print_freq, header='', total=None, start=0):
        """Yield from `iterable`, printing progress; `start` is the index of its first item (resumed epochs)."""
        total = len(iterable) if total is None else total
        width = len(str(total))
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        begin = end = time.time()
        i = start
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - 1 - i)))
                parts = [header, f'[{i:>{width}}/{total}]', f'eta: {eta}', str(self),
                         f'time: {iter_time}', f'data: {data_time}']
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB')
                log(self.delimiter.join(p for p in parts if p))
            i += 1
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - begin))
        steps = max(i - start, 1)
        log(f'{header} Total time: {elapsed} ({(time.time() - begin) / steps:.4f} s / it)')
