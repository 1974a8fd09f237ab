"""The paper's experiments as resumable sweeps: one engine for ``reproduce`` (Table 3) and
``grid`` (§4.3).

Where each job lives — open the file named for what you are looking for:

- :mod:`.plan`: the configuration, arms and runs (:class:`SweepConfig`, :class:`RunSpec`);
  :mod:`.datarule`: the statistic of Pre-Warm's n_patches rule over a dataset.
- :mod:`.arms`: one arm built — the seed's base weights, then the initialiser with its generator.
- :mod:`.engine`: prepare and execute a sweep — groups of runs trained stacked, recorded as they
  end; :mod:`.folder`: the output folder's lock and checks; :mod:`.interruption`: what an
  interruption kept.
- :mod:`.units`: the unit of work (:func:`~.units.run_group`) and the :class:`~.units.Job` it reads.
- :mod:`.executors`: where groups train — :mod:`.executors.local` (this process) and
  :mod:`.executors.ray` (a Ray cluster, ``--executor ray``; optional extra).
- :mod:`.records`: the output folder's files — ``results.jsonl``, model files, atomic writes.
- :mod:`.report`: Table 3's paired statistics and Table 1's data statistics.
- :mod:`.plots`: filters, curves and grid heat maps (``--plot``).
- :mod:`.jsonable`: tensors, numpy values and paths made JSON-safe for the records.
- :mod:`.reproduce`: ``prewarm-gpu reproduce``. :mod:`.grid`: ``prewarm-gpu grid``.
"""
from __future__ import annotations

from .arms import build_arm
from .errors import NothingToResumeError, ResultsExistError, SweepInterrupted, SweepLockedError
from .folder import sweep_lock
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
from .reproduce import prepare_sweep, reproduce
from .units import run_one

__all__ = [
    "SEEDS", "DEFAULT_ARCH", "PROTOCOL", "RESULTS", "SUMMARY", "TABLE", "Arm", "SweepConfig",
    "RunSpec", "Outcome", "ResultsExistError", "NothingToResumeError", "ResultsWriteError",
    "SweepLockedError", "SweepInterrupted", "sweep_lock", "record_problem", "plan_runs",
    "build_arm", "run_one", "read_results", "append_result", "summarise", "render_tables",
    "prepare_sweep", "reproduce", "repair_results", "environment",
]
