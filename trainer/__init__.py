"""The trainer's helpers (checkpoints, samplers, losses, preemption, distributed set-up, metrics) for
main.py and engine.py; the model itself is the `vim` package."""


class UserError(Exception):
    """A mistake in the command line, the data or a file that the user can fix.

    main.py prints these as one line (`error: ...`) and exits with code 2, without a traceback.
    """
