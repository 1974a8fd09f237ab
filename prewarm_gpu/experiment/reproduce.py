"""``prewarm-gpu reproduce``: Table 3 as a resumable sweep of datasets × seeds × inits, paired on
Kaiming, on the sweep engine (:mod:`.run`).

Output folder (``--out``): ``results.jsonl`` (:mod:`.records`), ``summary.json`` and ``table.md``
(:mod:`.report`), ``models/<dataset>-<init>-<seed>.pt`` (``--save-models``),
``filters_<dataset>.png`` and ``curves_<dataset>.png`` (``--plot``, :mod:`.plots`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .plan import RunSpec, SweepConfig, plan_runs
from .plots import import_pyplot, plot_curves, plot_filters
from .report import Outcome, write_summary
from .run import Outputs, execute, prepare

OUTPUTS = Outputs(write_summary, plot_filters, plot_curves)


def prepare_sweep(config: SweepConfig) -> tuple[SweepConfig, list[RunSpec]]:
    """Every check that needs no training (:func:`.run.prepare`); the normalised config and its
    runs."""
    return prepare(config, plan_runs, plot_check=import_pyplot)


def reproduce(config: SweepConfig, *, log: Callable[[str], None] | None = None,
              after_run: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
    """Run every missing run of the sweep, writing results as they finish.

    Raises:
        ResultsExistError: ``results.jsonl`` exists and ``config.resume`` is false.
        NothingToResumeError: ``config.resume`` but no finished run in ``config.out``.
        DatasetNotFoundError: a dataset is missing and ``config.download`` is false.
        ValueError, KeyError: a bad name, option, seed or step count (before any training).
        SweepLockedError: another process is writing to ``config.out``.
        ResultsWriteError: ``config.out`` is not writable or full (checked before training;
            a later failure leaves every record written before it intact, no torn line).
        SweepInterrupted: Ctrl-C or SIGTERM (via the CLI); its message says what was kept.
    """
    config, specs = prepare_sweep(config)
    return execute(config, specs, OUTPUTS, log=log, after_run=after_run)


def run_sweep(config: SweepConfig, *, log: Callable[[str], None] | None = None,
              after_run: Callable[[dict[str, Any]], None] | None = None) -> str:
    """:func:`reproduce`, returning its tables."""
    return reproduce(config, log=log, after_run=after_run).table
