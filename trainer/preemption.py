"""Stopping on a scheduler's signal (SLURM sends SIGUSR1 before the end of a job, SIGTERM on preemption) or
on Ctrl-C (SIGINT)."""
import contextlib
import signal

import torch
import torch.distributed as dist

from trainer.distributed import is_dist_avail_and_initialized

# sysexits.h EX_TEMPFAIL ("temporary failure, try again"): the run saved its state and wants a restart.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def shield_loader_worker(worker_id=None):
    """Data-loader worker init: SLURM's warning signal may reach every process of the job, and Ctrl-C
    reaches the whole foreground process group; the workers must outlive the step that the main
    process finishes before saving. (SIGTERM cannot be ignored there: the loader and multiprocessing
    end their workers with it.)"""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Preempted(Exception):
    """The run stopped on a signal; `saved`: a checkpoint was written just before."""

    def __init__(self, message, saved=True):
        super().__init__(message)
        self.saved = saved


@contextlib.contextmanager
def stop_at_once():
    """Outside the training loop (start-up, evaluation) a stop signal raises Preempted at once: nothing
    has been done since the last save, and the exit code is the same 75 as after a save."""
    def handle(signum, frame):
        raise Preempted(f'stopped by {signal.Signals(signum).name}', saved=False)

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopRequest:
    """Context manager: while active, SIGTERM/SIGUSR1/SIGINT only set `requested`; the training loop then
    finishes its step, saves and raises Preempted. A second Ctrl-C interrupts at once
    (KeyboardInterrupt). Previous handlers are restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, device):
        """Whether any process was asked to stop (collective: every process must call it)."""
        flag = torch.tensor([float(self.requested)], device=device)
        if is_dist_avail_and_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
