"""The sweep engine: every missing run of a plan, trained stacked in groups, recorded as it ends.

``reproduce`` and ``grid`` both run here (:func:`execute`): the same pairing (:mod:`.plan`), the
same stacked training of many runs (:func:`prewarm_gpu.batched.train_batched`), the same results
file with resume (:mod:`.records`), in-run checkpoints, one writer per folder, the same progress
bar and the same account of an interruption. What a sweep writes besides ``results.jsonl`` (its
tables and plots) is its :class:`Outputs`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpointer, parse_every
from ..checks import is_int
from ..data import ImageData, canonical_name, check_dataset, load_dataset
from ..train import TrainResult, train
from .arms import build_arm
from .plan import RunSpec, SweepConfig, batchable, needs_rule
from .records import (
    CHECKPOINTS,
    LOCK,
    RESULTS,
    ResultsWriteError,
    append_result,
    environment,
    latest_by_key,
    make_record,
    model_path,
    read_results,
    repair_results,
    save_model,
)


class ResultsExistError(FileExistsError):
    """``--out`` already holds results and ``--resume`` was not given."""


class _StepCounter:
    """Forwards step counts to ``progress`` and keeps their total, so a run (or a batch) that
    ends early can still account for the steps it will not take."""

    def __init__(self, progress: Callable[[int], None] | None):
        self.progress, self.done = progress, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(n)

    def finish(self, total: int) -> None:
        self(total - self.done)


# What a run may raise and still be only a failed run (the sweep goes on, the record keeps the
# traceback). An initialiser refuses its input with ValueError/TypeError (house style); training
# fails with RuntimeError (out of memory, a CUDA error) or ArithmeticError. Anything else
# (AttributeError, KeyError, IndexError, …) is a bug: it ends the sweep with its traceback.
INIT_ERRORS = (ValueError, TypeError, RuntimeError, ArithmeticError)
TRAIN_ERRORS = (RuntimeError, ArithmeticError)


def _failed(stage: str, e: BaseException) -> TrainResult:
    return TrainResult("failed", None, error=f"{stage}{type(e).__name__}: {e}",
                       traceback=traceback.format_exc())


@dataclass
class CheckpointPolicy:
    """Where one group of runs is checkpointed and how often (``--checkpoint-every``); ``active``
    is the :class:`~prewarm_gpu.checkpoint.Checkpointer` of the training under way."""

    path: Path
    every_steps: int | None = None
    every_seconds: float | None = None
    active: Checkpointer | None = None

    def open(self, specs: Sequence[RunSpec]) -> Checkpointer:
        """The checkpointer of ``specs`` trained together (a checkpoint of other runs is never
        loaded: the runs' keys are its fingerprint)."""
        self.active = Checkpointer(self.path, {"runs": [s.key for s in specs]},
                                   every_steps=self.every_steps, every_seconds=self.every_seconds)
        return self.active

    def remove(self) -> None:
        Checkpointer(self.path, None).remove()


def checkpoint_policy(config: SweepConfig, group: Sequence[RunSpec]) -> CheckpointPolicy | None:
    """``<out>/checkpoints/<dataset>-<hash of the group's keys>.pt``, or None when disabled."""
    every_steps, every_seconds = parse_every(config.checkpoint_every)
    if every_steps is None and every_seconds is None:
        return None
    return CheckpointPolicy(config.out / CHECKPOINTS / checkpoint_name(group), every_steps,
                            every_seconds)


def checkpoint_name(group: Sequence[RunSpec]) -> str:
    """``<dataset>-<hash of the group's run keys>.pt``: a group's checkpoint file."""
    digest = hashlib.sha256("\n".join(s.key for s in group).encode()).hexdigest()[:16]
    return f"{group[0].dataset}-{digest}.pt"


def run_one(spec: RunSpec, data: ImageData, *, progress: Callable[[int], None] | None = None,
            save_to: Path | None = None, graphs: str = "auto", compile: bool = False,
            checkpoint: CheckpointPolicy | None = None) -> dict[str, Any]:
    """Build, initialise and train one run; the ``results.jsonl`` record. An initialiser's
    :data:`INIT_ERRORS`, a training :data:`TRAIN_ERRORS` or a NaN/Inf loss give
    ``status="failed"`` with the error (and traceback); any other exception propagates. With
    ``checkpoint``, the run is checkpointed as it trains and continues from a checkpoint found."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {}
    step_progress = _StepCounter(progress)
    init_seconds = None
    try:
        model, report = build_arm(spec, data)
    except INIT_ERRORS as e:
        result = _failed("", e)
    else:
        init_seconds = time.perf_counter() - t0
        try:
            result = train(model, data, spec.train, seed=spec.seed, precision=spec.precision,
                           channels_last=spec.channels_last, progress=step_progress, graphs=graphs,
                           compile=compile,
                           checkpoint=checkpoint.open([spec]) if checkpoint else None)
        except TRAIN_ERRORS as e:
            result = _failed("training: ", e)
        if save_to is not None and result.status == "ok":
            save_model(model, save_to)
    if result.status != "ok":
        step_progress.finish(spec.train.steps)
    return make_record(spec, result, report, init_seconds, time.perf_counter() - t0)


def run_batch(specs: Sequence[RunSpec], data: ImageData, *,
              progress: Callable[[int], None] | None = None, backend: str = "auto",
              graphs: str = "auto", compile: bool = False, save_dir: Path | None = None,
              checkpoint: CheckpointPolicy | None = None) -> list[dict[str, Any]]:
    """Build and initialise every run of ``specs`` (one dataset, one architecture), train them
    together with :func:`prewarm_gpu.batched.train_batched`; one record per spec, in order.

    A run whose initialisation raises one of :data:`INIT_ERRORS` is recorded as failed alone; if
    the batched training raises one of :data:`TRAIN_ERRORS`, every run of the batch is recorded as
    failed with the error (the sweep goes on). Other exceptions propagate. With ``checkpoint``,
    the batch is checkpointed as it trains and continues from a checkpoint found."""
    from ..batched import train_batched

    records: dict[str, dict[str, Any]] = {}
    built = []
    for spec in specs:
        t0 = time.perf_counter()
        try:
            model, report = build_arm(spec, data)
            built.append((spec, model, report, time.perf_counter() - t0))
        except INIT_ERRORS as e:
            records[spec.key] = make_record(spec, _failed("", e), {}, None,
                                            time.perf_counter() - t0)
            _StepCounter(progress).finish(spec.train.steps)
    if built:
        step_progress = _StepCounter(progress)
        try:
            results = train_batched([b[1] for b in built], data, built[0][0].train,
                                    seeds=[b[0].seed for b in built],
                                    precision=built[0][0].precision, backend=backend,
                                    graphs=graphs, compile=compile,
                                    progress=step_progress,
                                    checkpoint=checkpoint.open([b[0] for b in built])
                                    if checkpoint else None)
        except TRAIN_ERRORS as e:
            results = [_failed("batched training: ", e) for _ in built]
            step_progress.finish(sum(b[0].train.steps for b in built))
        for (spec, model, report, init_s), r in zip(built, results, strict=True):
            if save_dir is not None and r.status == "ok":
                save_model(model, model_path(save_dir, spec))
            records[spec.key] = make_record(spec, r, report, init_s, init_s + r.seconds)
    for spec in specs:
        records[spec.key]["trainer"] = "batched"
    return [records[s.key] for s in specs]


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


class NothingToResumeError(FileNotFoundError):
    """``--resume`` was given but ``--out`` holds no finished run."""


class SweepLockedError(RuntimeError):
    """Another process is writing to the same ``--out``."""


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


class WorkersLost(RuntimeError):
    """Every worker of a distributed executor died for good with runs left to do; ``str()`` says
    what was kept (exit 5)."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or a kill during a sweep; ``str()`` says exactly what was kept and what was lost."""


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


def run_group(config: SweepConfig, group: Sequence[RunSpec], data: ImageData,
              progress: Callable[[int], None] | None = None,
              checkpoint: CheckpointPolicy | None = None) -> list[dict[str, Any]]:
    """Train one group of runs (the unit an executor runs: :func:`run_batch` for several, else
    :func:`run_one`); their records, in order, without the environment."""
    if len(group) > 1:
        records = run_batch(group, data, progress=progress, backend=config.backend,
                            graphs=config.graphs, compile=config.compile,
                            save_dir=config.out if config.save_models else None,
                            checkpoint=checkpoint)
    else:
        spec = group[0]
        records = [run_one(spec, data, progress=progress, checkpoint=checkpoint,
                           graphs=config.graphs, compile=config.compile,
                           save_to=model_path(config.out, spec) if config.save_models else None)]
        records[0]["trainer"] = "single"
    for rec in records:  # which data the run saw, so two folders can be shown to share it
        rec["data_fingerprint"] = data.fingerprint
    return records


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

