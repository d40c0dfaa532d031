"""Permanent errors: the ones that retrying cannot fix.

The trainer exits with ``kontrast.contract.EXIT_PERMANENT`` for these, so the operator's
podFailurePolicy fails the job at once (with this message in the pod's termination log)
instead of burning restarts on a CSV that will still be broken next time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional


class PermanentError(Exception):
    """Bad parameters or bad data: the run cannot succeed until the user changes something."""


class SpecError(PermanentError):
    """A TrainJob parameter that passed the schema but cannot work (names the spec field)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"spec.{field}: {message}")


class Interrupted(Exception):
    """Training was asked to stop (SIGTERM: preemption, a deleted pod) and saved a checkpoint
    first; the next run resumes from it. Not a failure of the run."""


@dataclass(frozen=True)
class DataProblem:
    """One problem in a data file. ``row`` is the 1-based data row (the header is row 0)
    and ``line`` the 1-based line of the file where that row ends (they differ only when a
    quoted field spans lines)."""

    file: str
    message: str
    row: Optional[int] = None
    column: Optional[str] = None
    line: Optional[int] = None

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}" + (f" (line {self.line})" if self.line is not None else ""))
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return ", ".join(where) + f": {self.message}"


class DataError(PermanentError):
    """One or more problems in the training or evaluation data.

    ``file``, ``row`` and ``column`` are those of the first problem; ``problems`` holds all
    that were found (the checks collect up to a limit rather than stopping at the first, so a
    user fixes a CSV in one round trip).
    """

    def __init__(self, problems: Iterable[DataProblem], truncated: int = 0):
        self.problems = list(problems)
        if not self.problems:
            raise ValueError("DataError needs at least one problem")
        self.truncated = truncated
        first = self.problems[0]
        self.file, self.row, self.column = first.file, first.row, first.column
        lines = [str(p) for p in self.problems]
        if truncated:
            lines.append(f"... and {truncated} more problem(s)")
        if len(lines) == 1:
            text = lines[0]
        else:
            text = f"{len(self.problems) + truncated} problems in the data:\n" + "\n".join(f"  - {l}" for l in lines)
        super().__init__(text)


class ProblemCollector:
    """Collects data problems up to ``limit`` and raises them together."""

    def __init__(self, limit: int = 20):
        self.limit = limit
        self.problems: list[DataProblem] = []
        self.dropped = 0

    def add(self, problem: DataProblem) -> None:
        if len(self.problems) < self.limit:
            self.problems.append(problem)
        else:
            self.dropped += 1

    def __bool__(self) -> bool:
        return bool(self.problems)

    def raise_if_any(self) -> None:
        if self.problems:
            raise DataError(self.problems, self.dropped)
