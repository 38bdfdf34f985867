"""Stopping on a scheduler's signal (SLURM sends SIGUSR1 before the end of a job, SIGTERM on preemption)."""
import signal

# sysexits.h EX_TEMPFAIL ("temporary failure, try again"): the run saved its state and wants a restart.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_warning_signal(worker_id=None):
    """Data-loader worker init: SLURM's warning signal may reach every process of the job, and the
    workers must outlive the step that the main process finishes before saving. (SIGTERM cannot be
    ignored there: the loader and multiprocessing end their workers with it.)"""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class Preempted(Exception):
    """Raised after the checkpoint of a signalled run is written."""


class StopRequest:
    """Context manager: while active, SIGTERM/SIGUSR1 only set `requested`; the training loop then
    finishes its step, saves and raises Preempted. Previous handlers are restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
