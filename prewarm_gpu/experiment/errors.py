"""The sweep engine's exceptions, its executors' included (the CLI maps each to its exit code:
2, 5, 130)."""
from __future__ import annotations

__all__ = ["ResultsExistError", "NothingToResumeError", "SweepLockedError", "WorkersLost",
           "SweepInterrupted", "ExecutorUnavailableError", "WorkersLostError"]


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


class ExecutorUnavailableError(RuntimeError):
    """``--executor ray`` could not start: the cluster is unreachable or lacks the device, or a
    worker does not run the same code or see the data. Nothing was trained (exit 2)."""


class WorkersLostError(WorkersLost):
    """Every Ray worker died for good with groups left to run; finished runs are kept (exit 5)."""
