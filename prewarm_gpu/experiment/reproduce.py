"""``prewarm-gpu reproduce``: Table 3 as a resumable sweep of datasets × seeds × inits, paired on
Kaiming, on the sweep engine (:mod:`.engine`).

Output folder (``--out``): ``results.jsonl`` (:mod:`.records`), ``summary.json`` and ``table.md``
(:mod:`.report`), ``models/<dataset>-<init>-<seed>.pt`` (``--save-models``),
``filters_<dataset>.png`` and ``curves_<dataset>.png`` (``--plot``, :mod:`.plots`).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .engine import Outputs, execute, prepare
from .plan import RunSpec, SweepConfig, plan_runs
from .plots import import_pyplot, plot_curves, plot_filters
from .report import Outcome, write_summary


def prepare_sweep(config: SweepConfig) -> tuple[SweepConfig, list[RunSpec]]:
    """Every check that needs no training (:func:`.engine.prepare`); the normalised config and
    its runs."""
    return prepare(config, plan_runs, plot_check=import_pyplot)


def sweep_outputs(config: SweepConfig, specs: list[RunSpec]) -> Outputs:
    """``summary.json`` and ``table.md``; with ``--plot``, the filters and the curves."""
    plot = config.plot
    return Outputs(partial(write_summary, config, specs),
                   partial(plot_filters, config, specs) if plot else None,
                   partial(plot_curves, config, specs) if plot else None)


def reproduce(config: SweepConfig, *, log: Callable[[str], None] | None = None) -> Outcome:
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
    return execute(config, specs, sweep_outputs(config, specs), log=log)
