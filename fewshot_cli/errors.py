"""The two kinds of error a user sees: bad input (exit 2) and a run that failed (exit 1)."""


class BadInput(Exception):
    """Bad usage or input found before any training step: exit 2, one sentence, no traceback."""

    exit_code = 2


class RunFailed(Exception):
    """The run broke while running: exit 1, one sentence, `run_end` says `failed`."""

    exit_code = 1
