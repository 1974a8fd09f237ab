"""The sweep engine: every missing run of a plan, trained stacked in groups, recorded as it ends.

``reproduce`` and ``grid`` both run here (:func:`execute`): the same pairing (:mod:`.plan`), the
same stacked training of many runs (:func:`prewarm_gpu.batched.train_batched`), the same results
file with resume (:mod:`.records`), in-run checkpoints, one writer per folder, the same progress
bar and the same account of an interruption. What a sweep writes besides ``results.jsonl`` (its
tables and plots) is its :class:`Outputs`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..checks import is_int
from ..data import ImageData, canonical_name, check_dataset, load_dataset
from .errors import (
    NothingToResumeError,
    ResultsExistError,
    SweepInterrupted,
    SweepLockedError,
    WorkersLost,
)
from .plan import RunSpec, SweepConfig, batchable, needs_rule
from .records import (
    CHECKPOINTS,
    LOCK,
    RESULTS,
    ResultsWriteError,
    append_result,
    environment,
    latest_by_key,
    read_results,
    repair_results,
)
from .units import (  # noqa: F401 — run_one/run_batch/INIT_ERRORS re-exported for callers
    INIT_ERRORS,
    TRAIN_ERRORS,
    CheckpointPolicy,
    checkpoint_name,
    checkpoint_policy,
    run_batch,
    run_group,
    run_one,
)


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


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/.lock`` (an exclusive ``fcntl`` lock, released by the OS when the process
    ends, so a lock left by a killed process is never stale) for the sweep: one writer per folder.
    The file holds the owner's pid, for the message a second writer gets."""
    import fcntl

    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked(out, _owner(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _owner(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


def _locked(out: Path, owner: str) -> SweepLockedError:
    return SweepLockedError(f"{out} is in use by another prewarm-gpu (pid {owner}); wait for it "
                            "to finish, or choose another --out")


def lock_holder(out: Path) -> str | None:
    """The pid written in ``<out>/.lock`` when a live process holds that lock (:func:`sweep_lock`),
    else None; creates nothing. A shared lock is taken and dropped at once to test it, so a sweep
    starting in that instant may see the folder as busy (and say so): never the reverse."""
    import fcntl

    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or unreadable): nobody holds it through this path
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _check_writable(out: Path, min_free: int = 64 * 2**20) -> None:
    """``--out`` can be created and written, with room left, before any training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as e:
        raise ResultsWriteError(f"--out {out} is not writable ({e.strerror or e}); nothing was "
                                "trained") from e
    free = shutil.disk_usage(out).free
    if free < min_free:
        raise ResultsWriteError(f"--out {out}: only {free / 2**20:.0f} MiB free on its disk "
                                f"(at least {min_free / 2**20:.0f} MiB needed); nothing was "
                                "trained")


def _check_out(config: SweepConfig) -> None:
    path = config.out / RESULTS
    has_results = path.exists() and path.stat().st_size > 0
    if has_results and not (config.resume or config.report_only):
        raise ResultsExistError(
            f"{path} already holds results; pass --resume to complete that sweep (only missing "
            f"runs are run), or choose another --out. Nothing was overwritten.")
    has_checkpoints = any((config.out / CHECKPOINTS).glob("*.pt"))
    if config.report_only and not has_results:
        raise NothingToResumeError(f"--report-only: {config.out} holds no results to report")
    if config.resume and not has_results and not has_checkpoints:
        raise NothingToResumeError(
            f"--resume: {config.out} holds no finished run ({RESULTS} is missing or empty) and "
            "no checkpoint, so there is nothing to resume. Check --out, or drop --resume to start "
            "the sweep.")


def _check_data(config: SweepConfig) -> None:
    """Fail before any training when a dataset is missing (not after hours of other datasets)."""
    if config.download:
        return
    for ds in config.datasets:
        # raises, naming every place looked at (digits: no files), or the bad file and its fault
        check_dataset(ds, config.data_dir)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # in a log file, a line every 10 s rather than every 0.5 s
    return tqdm(total=total, unit="step", desc="sweep", dynamic_ncols=True,
                mininterval=0.5 if tty else 10.0, smoothing=0.05, file=sys.stderr)


@dataclass
class Outputs:
    """What a sweep writes besides ``results.jsonl``: ``write(config, specs, records, env)``
    rewrites its summary files (after every group and at the end) and returns what
    :func:`execute` returns (an :class:`~.report.Outcome`);
    with ``--plot``, ``plot_dataset(config, specs, data)`` runs once per dataset with its data
    loaded and ``plot_end(config, specs, records)`` at the end."""

    write: Callable[..., str]
    plot_dataset: Callable[..., Any] | None = None
    plot_end: Callable[..., Any] | None = None


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
    if config.executor not in ("local", "ray"):
        raise ValueError(f"--executor must be 'local' or 'ray', got {config.executor!r}")
    if config.executor == "ray" and not config.report_only:
        from .ray_executor import import_ray

        import_ray()  # ImportError naming the extra, before any work
    specs = plan(replace(config, rule_source="batch"))  # every check that reads no data
    holder = lock_holder(config.out)
    if holder is not None:  # before _check_out: a sweep just started has no results yet
        raise _locked(config.out, holder)
    _check_out(config)
    if config.plot and plot_check is not None:
        plot_check()  # fail now, not after training
    _check_data(config)
    config = with_dataset_rules(config, specs)
    specs = plan(config)
    if not config.report_only:
        from .precheck import check_arms

        # a cell that can never run: now, not after Kaiming's (n_patches known, from the rule).
        # The memory check is of this process's device: not where Ray's workers train.
        check_arms(specs, "meta" if config.executor == "ray" else config.device)
    _check_writable(config.out)  # creates --out: last, so a refused sweep leaves nothing
    return config, specs


def with_dataset_rules(config: SweepConfig, specs: Sequence[RunSpec]) -> SweepConfig:
    """``config`` with ``dataset_rules`` filled (:func:`.report.dataset_rule`, the whole training
    split) for each dataset that has a Pre-Warm arm without n_patches, when ``rule_source`` is
    "dataset": one load and one pass over each dataset, before any training."""
    from .report import dataset_rule

    if config.rule_source != "dataset":
        return config
    todo = [ds for ds in config.datasets if ds not in config.dataset_rules
            and any(s.dataset == ds and needs_rule(s.arm) for s in specs)]
    rules = dict(config.dataset_rules)
    for ds in todo:
        rules[ds] = dataset_rule(load_dataset(ds, data_dir=config.data_dir,
                                              download=config.download, device=config.device))
    return replace(config, dataset_rules=rules)


def execute(config: SweepConfig, specs: list[RunSpec], outputs: Outputs, *,
            log: Callable[[str], None] | None = None,
            after_run: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Run every missing run of ``specs`` (a prepared plan), writing results as they finish, under
    the folder's lock; return what ``outputs.write`` returns at the end.

    Raises:
        SweepLockedError: another process is writing to ``config.out``.
        ResultsWriteError: a later write failure (every record written before it is intact, no
            torn line).
        SweepInterrupted: Ctrl-C or SIGTERM (via the CLI); its message says what was kept.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    with sweep_lock(config.out):
        return _execute(config, specs, outputs, log, after_run)


class LocalExecutor:
    """Runs the groups one after another in this process, on ``config.device`` (the default)."""

    name = "local"

    def __init__(self, log: Callable[[str], None]):
        self.log, self.data = log, None

    def group_size(self, config: SweepConfig, n_runs: int) -> int | None:
        """The most runs trained together: ``--group-size`` (None: all of an architecture)."""
        return config.group_size

    def load(self, config: SweepConfig, ds: str) -> ImageData:
        if self.data is None or self.data.spec.name != ds:
            self.data = None  # free the previous dataset first
            self.data = load_dataset(ds, data_dir=config.data_dir, download=config.download,
                                     device=config.device)
            if self.data.source is not None:
                self.log(f"{ds}: read from {self.data.source}")
        return self.data

    def map(self, config: SweepConfig, ds: str, groups: list[list[RunSpec]],
            state: dict[str, Any], bar) -> Iterator[tuple[list[RunSpec], list[dict[str, Any]]]]:
        """Yield ``(group, records)`` as each group finishes; ``state`` says what is in flight."""
        data = self.load(config, ds)
        update = bar.update if bar is not None else None
        for group in groups:
            ckpt = checkpoint_policy(config, group)
            state["in_flight"], state["checkpoints"] = list(group), [ckpt]
            if bar is not None:
                bar.set_postfix_str(group[0].label if len(group) == 1 else
                                    f"{ds}: {len(group)} runs batched", refresh=False)
            yield group, run_group(config, group, data, update, ckpt)

    def close(self) -> None:
        self.data = None


def make_executor(config: SweepConfig, log: Callable[[str], None]):
    """The executor ``config.executor`` names (``local``, or ``ray``: the optional extra)."""
    if config.executor == "local":
        return LocalExecutor(log)
    if config.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(config, log)
    raise ValueError(f"--executor must be 'local' or 'ray', got {config.executor!r}")


def _execute(config: SweepConfig, specs: list[RunSpec], outputs: Outputs, log,
             after_run) -> Any:
    path = config.out / RESULTS
    moved = repair_results(path)
    if moved:
        log(f"moved {moved} corrupt or truncated line(s) of {path} to {path.name}.torn; those "
            "runs will be run again")
    records = read_results(path)
    latest = latest_by_key(records)
    todo = [] if config.report_only else \
        [s for s in specs if not _done(latest.get(s.key), config.retry_failed)]
    env = environment(config.device)
    if config.resume:
        log(f"resume: {len(specs) - len(todo)} of {len(specs)} runs already in {path}; "
            f"running the other {len(todo)}")
    state: dict[str, Any] = {"written": 0, "in_flight": [], "checkpoints": []}
    executor, bar = LocalExecutor(log), None
    try:
        if todo:
            executor = make_executor(config, log)
        bar = _progress_bar(sum(s.train.steps for s in todo), config.progress and bool(todo))
        for ds in config.datasets:
            mine = [s for s in todo if s.dataset == ds]
            groups = _groups(mine, config.batch, executor.group_size(config, len(mine)))
            for group, recs in executor.map(config, ds, groups, state, bar) if mine else ():
                for spec, rec in zip(group, recs, strict=True):
                    rec["env"] = rec.get("env") or env
                    append_result(path, rec)
                    records.append(rec)
                    state["written"] += 1
                    state["in_flight"] = [s for s in state["in_flight"] if s is not spec]
                    if rec["status"] != "ok":
                        log(f"run failed: {spec.label}: {rec['error']}")
                    if after_run is not None:
                        after_run(rec)
                done = checkpoint_policy(config, group)
                if done is not None:
                    done.remove()  # its runs are recorded
                    state["checkpoints"] = [c for c in state["checkpoints"]
                                            if c is not None and c.path != done.path]
                outputs.write(config, specs, records, env)
            if config.plot and outputs.plot_dataset is not None and \
                    (mine or _has_ok(latest, ds)):
                local = executor if isinstance(executor, LocalExecutor) else LocalExecutor(log)
                outputs.plot_dataset(config, specs, local.load(config, ds))
    except KeyboardInterrupt as e:
        executor.close()
        outputs.write(config, specs, records, env)
        raise SweepInterrupted(_interrupted(config, specs, records, state)) from e
    except WorkersLost as e:
        outputs.write(config, specs, records, env)
        raise type(e)(f"{e}. {_interrupted(config, specs, records, state)}") from None
    finally:
        executor.close()
        if bar is not None:
            bar.close()
    outcome = outputs.write(config, specs, records, env)
    if config.plot and outputs.plot_end is not None:
        outputs.plot_end(config, specs, records)
    return outcome


def _interrupted(config: SweepConfig, specs: Sequence[RunSpec], records, state) -> str:
    """What an interruption kept and lost, exactly."""
    latest = latest_by_key(records)
    kept = sum(1 for s in specs if _done(latest.get(s.key), config.retry_failed))
    state["in_flight"] = [s for s in state["in_flight"]
                          if not _done(latest.get(s.key), config.retry_failed)]
    path = config.out / RESULTS
    parts = [f"{kept} of {len(specs)} runs are finished and kept in {path} "
             f"({state['written']} written by this command)."]
    lost = state["in_flight"]
    ckpts = [c for c in state["checkpoints"] if c is not None]
    if len(ckpts) > 1 or state.get("remote"):  # several groups on workers: their steps unknown here
        if lost:
            parts.append(f"In flight on {state.get('remote') or 'workers'}: {len(lost)} run(s); "
                         f"those that wrote a checkpoint continue from it in "
                         f"{config.out / CHECKPOINTS} with --resume, the others start again "
                         "from step 0.")
        if len(specs) - kept - len(lost):
            parts.append(f"Not started: {len(specs) - kept - len(lost)} run(s).")
        parts.append("Run the same command with --resume to complete the sweep." if kept or lost
                     else "Nothing to resume: run the same command again (without --resume).")
        return " ".join(parts)
    ckpt = ckpts[0] if ckpts else None
    saved = ckpt.active.saved_step if ckpt is not None and ckpt.active is not None else None
    if lost:
        one = len(lost) == 1
        what = f"the run {lost[0].label}" if one else \
            f"the {len(lost)} runs training together ({lost[0].dataset}, batched)"
        if saved:
            parts.append(f"In flight: {what}; {'its' if one else 'their'} progress up to step "
                         f"{saved} is checkpointed in {ckpt.path}, and --resume continues from "
                         "there.")
        else:
            parts.append(f"Lost: {what}; no checkpoint was written yet (--checkpoint-every), "
                         f"so {'it starts' if one else 'they start'} again from step 0.")
    if kept or saved:
        parts.append("Run the same command with --resume to complete the sweep.")
    else:
        parts.append("Nothing to resume: run the same command again (without --resume).")
    return " ".join(parts)


def _done(rec: dict[str, Any] | None, retry_failed: bool) -> bool:
    return rec is not None and (rec.get("status") == "ok" or not retry_failed)


def _has_ok(latest: dict[str, dict[str, Any]], ds: str) -> bool:
    return any(r.get("dataset") == ds and r.get("status") == "ok" for r in latest.values())

