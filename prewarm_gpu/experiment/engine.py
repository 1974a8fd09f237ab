"""The sweep engine: every missing run of a plan, trained stacked in groups, recorded as it ends.

``reproduce`` and ``grid`` both run here: :func:`prepare` makes every check that needs no
training and plans the runs (:mod:`.plan`); :func:`execute` takes the folder's lock
(:mod:`.folder`), skips the runs already recorded (:mod:`.records`), splits the rest into groups
and hands them to an executor (:mod:`.executors`) with the sweep's :class:`~.units.Job`, appends
each record as its group ends, and rewrites the sweep's :class:`Outputs`; an interruption says
what was kept (:mod:`.interruption`).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..checks import is_int
from ..data import ImageData, canonical_name, check_dataset
from .datarule import dataset_rule
from .errors import SweepInterrupted, WorkersLost
from .executors import check_executor, make_executor
from .executors.local import LocalExecutor
from .folder import check_out, check_writable, lock_holder, locked, sweep_lock
from .interruption import SweepState, interrupted
from .plan import RunSpec, SweepConfig, batchable, needs_rule
from .records import (
    RESULTS,
    append_result,
    environment,
    is_done,
    latest_by_key,
    read_results,
    repair_results,
)
from .units import Job, checkpoint_policy, load_data


def _groups(specs: Sequence[RunSpec], batch: bool,
            size: int | None = None) -> list[list[RunSpec]]:
    """Runs that train together: with ``batch``, the runs of a batchable architecture (in plan
    order), at most ``size`` at a time (None: all of them); every other run alone."""
    if not batch:
        return [[s] for s in specs]
    groups: dict[str, list[RunSpec]] = {}
    out: list[list[RunSpec]] = []
    for s in specs:
        if batchable(s.arch):
            if s.arch not in groups or (size is not None and len(groups[s.arch]) >= size):
                groups[s.arch] = []
                out.append(groups[s.arch])
            groups[s.arch].append(s)
        else:
            out.append([s])
    return out


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # in a log file, a line every 10 s rather than every 0.5 s
    return tqdm(total=total, unit="step", desc="sweep", dynamic_ncols=True,
                mininterval=0.5 if tty else 10.0, smoothing=0.05, file=sys.stderr)


@dataclass
class Outputs:
    """What a sweep writes besides ``results.jsonl``, bound to its configuration and runs by
    :mod:`.reproduce` or :mod:`.grid`: ``write(records, env)`` rewrites its summary files (after
    every group and at the end) and returns what :func:`execute` returns (an
    :class:`~.report.Outcome`); with ``--plot``, ``plot_dataset(data)`` runs once per dataset
    with its data loaded and ``plot_end(records)`` at the end."""

    write: Callable[[list[dict[str, Any]], dict[str, Any]], Any]
    plot_dataset: Callable[[ImageData], Any] | None = None
    plot_end: Callable[[list[dict[str, Any]]], Any] | None = None


def prepare(config: SweepConfig, plan: Callable[[SweepConfig], list[RunSpec]],
            *, plot_check: Callable[[], Any] | None = None) -> tuple[SweepConfig, list[RunSpec]]:
    """Every check that needs no training, in the order a user would want the errors: the plan
    (names, options, seeds, steps), the output folder, matplotlib for ``--plot``, the data.

    Returns the normalised config and its runs (``plan(config)``)."""
    config = replace(config, datasets=[canonical_name(d) for d in config.datasets],
                     out=Path(config.out),  # numpy ints as plain ints (the records are JSON)
                     seeds=[int(s) if is_int(s) else s for s in config.seeds])
    if config.group_size is not None and config.group_size < 1:
        raise ValueError(f"group_size must be >= 1 or None, got {config.group_size}")
    check_executor(config.executor, needed=not config.report_only)  # before any work
    specs = plan(replace(config, rule_source="batch"))  # every check that reads no data
    holder = lock_holder(config.out)
    if holder is not None:  # before check_out: a sweep just started has no results yet
        raise locked(config.out, holder)
    check_out(config.out, resume=config.resume, report_only=config.report_only)
    if config.plot and plot_check is not None:
        plot_check()  # fail now, not after training
    if not config.download:  # fail before any training, not after hours of other datasets
        for ds in config.datasets:  # raises, naming every place looked at, or the bad file
            check_dataset(ds, config.data_dir)
    config = with_dataset_rules(config, specs)
    specs = plan(config)
    if not config.report_only:
        from .precheck import check_arms

        # a cell that can never run: now, not after Kaiming's (n_patches known, from the rule).
        # The memory check is of this process's device: not where Ray's workers train.
        check_arms(specs, "meta" if config.executor == "ray" else config.device)
    check_writable(config.out)  # creates --out: last, so a refused sweep leaves nothing
    return config, specs


def with_dataset_rules(config: SweepConfig, specs: Sequence[RunSpec]) -> SweepConfig:
    """``config`` with ``dataset_rules`` filled (:func:`.datarule.dataset_rule`, the whole
    training split) for each dataset that has a Pre-Warm arm without n_patches, when
    ``rule_source`` is "dataset": one load and one pass over each dataset, before any training."""
    if config.rule_source != "dataset":
        return config
    todo = [ds for ds in config.datasets if ds not in config.dataset_rules
            and any(s.dataset == ds and needs_rule(s.arm) for s in specs)]
    rules = dict(config.dataset_rules)
    job = job_of(config)
    for ds in todo:
        rules[ds] = dataset_rule(load_data(job, ds))
    return replace(config, dataset_rules=rules)


def job_of(config: SweepConfig) -> Job:
    """The :class:`~.units.Job` of a sweep: each of its fields from the config's field of the
    same name."""
    return Job(**{f.name: getattr(config, f.name) for f in fields(Job)})


@dataclass(frozen=True)
class _Loop:
    """What the loop of :func:`execute` reads of the sweep besides its job."""

    datasets: list[str]
    batch: bool
    retry_failed: bool
    out: Path
    progress: bool


def execute(config: SweepConfig, specs: list[RunSpec], outputs: Outputs, *,
            log: Callable[[str], None] | None = None) -> Any:
    """Run every missing run of ``specs`` (a prepared plan), writing results as they finish, under
    the folder's lock; return what ``outputs.write`` returns at the end.

    Raises:
        SweepLockedError: another process is writing to ``config.out``.
        ResultsWriteError: a later write failure (every record written before it is intact, no
            torn line).
        SweepInterrupted: Ctrl-C or SIGTERM (via the CLI); its message says what was kept.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    loop = _Loop(config.datasets, config.batch, config.retry_failed, config.out, config.progress)
    job = job_of(config)

    def executor():  # only when there is something to train: Ray starts nothing otherwise
        return make_executor(config.executor, job, log, datasets=config.datasets,
                             ray_address=config.ray_address)

    path = config.out / RESULTS
    with sweep_lock(config.out):
        records = _read(path, log)
        latest = latest_by_key(records)
        todo = [] if config.report_only else \
            [s for s in specs if not is_done(latest.get(s.key), config.retry_failed)]
        if config.resume:
            log(f"resume: {len(specs) - len(todo)} of {len(specs)} runs already in {path}; "
                f"running the other {len(todo)}")
        env = environment(config.device)
        return _run(loop, job, specs, todo, records, outputs, executor, env, log)


def _read(path: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The records of ``results.jsonl``, its torn lines moved aside first."""
    moved = repair_results(path)
    if moved:
        log(f"moved {moved} corrupt or truncated line(s) of {path} to {path.name}.torn; those "
            "runs will be run again")
    return read_results(path)


def record_run(path: Path, spec: RunSpec, rec: dict[str, Any], records: list[dict[str, Any]],
               state: SweepState, env: dict[str, Any], log: Callable[[str], None]) -> None:
    """Append one finished run's record to ``results.jsonl`` (and to ``records``)."""
    rec["env"] = rec.get("env") or env
    append_result(path, rec)
    records.append(rec)
    state.written += 1
    state.in_flight = [s for s in state.in_flight if s is not spec]
    if rec["status"] != "ok":
        log(f"run failed: {spec.label}: {rec['error']}")


def _run(loop: _Loop, job: Job, specs, todo, records, outputs: Outputs, new_executor, env,
         log) -> Any:
    """The loop of :func:`execute`, under the lock: each dataset's groups through the executor,
    each record appended as its group ends; an interruption's account of what was kept."""
    path, state = loop.out / RESULTS, SweepState()
    executor, bar = LocalExecutor(job, log), None
    try:
        if todo:
            executor = new_executor()
        bar = _progress_bar(sum(s.train.steps for s in todo), loop.progress and bool(todo))
        for ds in loop.datasets:
            mine = [s for s in todo if s.dataset == ds]
            groups = _groups(mine, loop.batch, executor.group_size(len(mine)))
            for group, recs in executor.map(ds, groups, state, bar) if mine else ():
                for spec, rec in zip(group, recs, strict=True):
                    record_run(path, spec, rec, records, state, env, log)
                _forget_checkpoint(job, group, state)  # its runs are recorded
                outputs.write(records, env)
            if outputs.plot_dataset is not None and (mine or _has_ok(records, ds)):
                local = executor if isinstance(executor, LocalExecutor) else \
                    LocalExecutor(job, log)
                outputs.plot_dataset(local.load(ds))
    except KeyboardInterrupt as e:
        executor.close()
        outputs.write(records, env)
        raise SweepInterrupted(interrupted(specs, records, state, loop.out,
                                           loop.retry_failed)) from e
    except WorkersLost as e:
        outputs.write(records, env)
        raise type(e)(f"{e}. {interrupted(specs, records, state, loop.out, loop.retry_failed)}"
                      ) from None
    finally:
        executor.close()
        if bar is not None:
            bar.close()
    outcome = outputs.write(records, env)
    if outputs.plot_end is not None:
        outputs.plot_end(records)
    return outcome


def _forget_checkpoint(job: Job, group: list[RunSpec], state: SweepState) -> None:
    done = checkpoint_policy(job, group)
    if done is not None:
        done.remove()
        state.checkpoints = [c for c in state.checkpoints if c is not None and c.path != done.path]


def _has_ok(records: Sequence[dict[str, Any]], ds: str) -> bool:
    return any(r.get("dataset") == ds and r.get("status") == "ok"
               for r in latest_by_key(records).values())
