"""One exception type for bad input, so the CLI can answer it with exit code 2 and a precise message."""
from __future__ import annotations


class RunStopped(RuntimeError):
    """A run ended early for a reason its message explains (preempted, diverged, a failed step):
    the CLI prints the message without a traceback and exits with status 1."""


class InputError(Exception):
    """Bad user input: a file, line/row or field the user can fix.

    The message always names where the problem is; the CLI prints it without a traceback.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = []
        if path is not None:
            where.append(str(path) + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.message, self.path, self.line, self.field = message, path, line, field
