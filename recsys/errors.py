"""Domain errors shared by every package.

Each error says what is wrong and what to do. The CLI maps them to exit codes and the
gRPC layer to status codes, in one place each; nothing else catches them broadly.
"""

from __future__ import annotations

from pathlib import Path


class RecsysError(Exception):
    """Base class of the project's domain errors (exit code 2 in the CLI)."""


class DataFormatError(RecsysError):
    """A data file is malformed: names the file, the 1-based line (if known) and the problem.

    Example::

        raise DataFormatError("data/interactions.csv", 12, "timestamp 'abc' is not an integer")
        # -> data/interactions.csv, line 12: timestamp 'abc' is not an integer
    """

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class DatasetNotFoundError(RecsysError):
    """A named dataset or a dataset directory cannot be found."""


class ValidationError(RecsysError, ValueError):
    """An argument or tensor has the wrong shape, dtype, range or value."""


class NotFoundError(RecsysError, KeyError):
    """An id (user, item, prototype, ...) is unknown."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
