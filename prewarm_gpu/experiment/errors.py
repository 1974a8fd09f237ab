"""The sweep engine's exceptions (the CLI maps each to its exit code: 2, 5, 130)."""
from __future__ import annotations

__all__ = ["ResultsExistError", "NothingToResumeError", "SweepLockedError", "WorkersLost",
           "SweepInterrupted"]


class ResultsExistError(FileExistsError):
    """``--out`` already holds results and ``--resume`` was not given."""


class NothingToResumeError(FileNotFoundError):
    """``--resume`` was given but ``--out`` holds no finished run."""


class SweepLockedError(RuntimeError):
    """Another process is writing to the same ``--out``."""


class WorkersLost(RuntimeError):
    """Every worker of a distributed executor died for good with runs left to do; ``str()`` says
    what was kept (exit 5)."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or a kill during a sweep; ``str()`` says exactly what was kept and what was lost."""
