"""The paper's experiments as resumable sweeps: one engine for ``reproduce`` (Table 3) and
``grid`` (§4.3).

Where each job lives — open the file named for what you are looking for:

- :mod:`.plan`: the configuration, arms and runs (:class:`SweepConfig`, :class:`RunSpec`).
- :mod:`.arms`: one arm built — the seed's base weights, then the initialiser with its generator.
- :mod:`.run`: the engine — groups of runs trained stacked, checkpoints, the lock, interruption;
  the local executor (:class:`~.run.LocalExecutor`, :func:`~.run.run_group`, the unit of work).
- :mod:`.ray_executor`: the same groups on a Ray cluster (``--executor ray``; optional extra).
- :mod:`.records`: the output folder's files — ``results.jsonl``, model files, atomic writes.
- :mod:`.report`: Table 3's paired statistics and Table 1's data statistics.
- :mod:`.plots`: filters, curves and grid heat maps (``--plot``).
- :mod:`.jsonable`: tensors, numpy values and paths made JSON-safe for the records.
- :mod:`.reproduce`: ``prewarm-gpu reproduce``. :mod:`.grid`: ``prewarm-gpu grid``.
"""
from __future__ import annotations

from .arms import build_arm
from .errors import NothingToResumeError, ResultsExistError, SweepInterrupted, SweepLockedError
from .plan import DEFAULT_ARCH, PROTOCOL, SEEDS, Arm, RunSpec, SweepConfig, plan_runs
from .records import (
    RESULTS,
    SUMMARY,
    TABLE,
    ResultsWriteError,
    append_result,
    environment,
    read_results,
    record_problem,
    repair_results,
)
from .report import Outcome, render_tables, summarise
from .reproduce import prepare_sweep, reproduce, run_sweep
from .run import sweep_lock
from .units import run_one

__all__ = [
    "SEEDS", "DEFAULT_ARCH", "PROTOCOL", "RESULTS", "SUMMARY", "TABLE", "Arm", "SweepConfig",
    "RunSpec", "Outcome", "ResultsExistError", "NothingToResumeError", "ResultsWriteError",
    "SweepLockedError", "SweepInterrupted", "sweep_lock", "record_problem", "plan_runs",
    "build_arm", "run_one", "read_results", "append_result", "summarise", "render_tables",
    "prepare_sweep", "run_sweep", "reproduce", "repair_results", "environment",
]
