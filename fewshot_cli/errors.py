"""The errors a user sees: bad input (exit 2), a run that failed (exit 1), an interrupted run (exit 130).

The CLI prints `<label>: <message>` on one line and exits with the class's `exit_code`."""


class BadInput(Exception):
    """Bad usage or input found before any training step: exit 2, one sentence, no traceback."""

    exit_code = 2
    label = "error"


class RunFailed(Exception):
    """The run broke while running: exit 1, one sentence, `run_end` says `failed`."""

    exit_code = 1
    label = "error"


class CannotWrite(RunFailed):
    """An operating-system error writing the run directory: a full or read-only disk, a permission, a file in the
    way. Before the first training step it becomes bad input (exit 2); after it, a failed run (exit 1)."""

    def __init__(self, path: object, err: BaseException) -> None:
        cause = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        super().__init__(f"Cannot write {path}: {cause}.")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the checkpoint and `run_end` were written. Exit 130."""

    exit_code = 130
    label = "interrupted"

    def __init__(self, message: str = "checkpoint written; continue with --resume RUN_DIR") -> None:
        super().__init__(message)
