"""Trainer helpers: user-facing errors, distributed set-up, and the metric logger."""
import datetime
import os
import re
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake in the command line, the data or a file that the user can fix.

    main.py prints these as one line (`error: ...`) and exits with code 2, without a traceback.
    """


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def log(*values):
    """print() on the main process only: every process would print the same progress lines."""
    if is_main_process():
        print(*values, flush=True)


def first_slurm_host(nodelist):
    """First host name of a SLURM node list such as `gpu[07-09,12],cpu3` (-> `gpu07`)."""
    match = re.match(r'([^,\[]+)(?:\[([^\]]+)\])?', nodelist.strip())
    if not match:
        raise UserError(f'cannot read SLURM_NODELIST={nodelist!r}: set MASTER_ADDR to the first node\'s host name')
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r'[-,]', ranges)[0]


def init_distributed_mode(args):
    """Join the process group described by torchrun's or SLURM's variables; no-op for a single process.

    Sets args.distributed, args.rank, args.world_size and args.gpu (the local device index).
    """
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:  # torchrun
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', 0))
    elif int(env.get('SLURM_NTASKS', 1)) > 1 and 'SLURM_PROCID' in env:  # srun, one task per GPU
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        args.gpu = int(env.get('SLURM_LOCALID', 0))
        if 'MASTER_ADDR' not in env:
            env['MASTER_ADDR'] = first_slurm_host(env.get('SLURM_NODELIST', env.get('SLURM_JOB_NODELIST', '')))
        # A port derived from the job id lets several jobs share a node without clashing.
        env.setdefault('MASTER_PORT', str(20000 + int(env.get('SLURM_JOB_ID', 9500)) % 20000))
        env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'] = str(args.rank), str(args.world_size), str(args.gpu)
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    args.distributed = True
    use_cuda = str(args.device).startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()


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
