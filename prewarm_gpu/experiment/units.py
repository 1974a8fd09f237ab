"""The unit of work of a sweep: one group of runs built, trained together and recorded.

An executor (:mod:`.executors.local` or :mod:`.executors.ray`) hands each group to
:func:`run_group` with the sweep's :class:`Job` (what a unit of work reads, not the sweep's
whole configuration): :func:`run_batch` trains several runs stacked
(:func:`prewarm_gpu.training.loop.train_batched`), :func:`run_one` trains one; each gives the runs'
``results.jsonl`` records. A run's own failure (an initialiser's refusal, a NaN loss, an out-of-
memory) is a failed record, never the sweep's end; anything else is a bug and propagates.
"""
from __future__ import annotations

import hashlib
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import ImageData, load_dataset
from ..train import TrainResult, choose_backend, train
from ..training.checkpoint import Checkpointer, parse_every
from .arms import build_arm
from .plan import RunSpec
from .records import CHECKPOINTS, make_record, model_path, save_model

__all__ = ["Job", "load_data", "run_group", "run_one", "run_batch", "CheckpointPolicy",
           "checkpoint_policy", "checkpoint_name", "INIT_ERRORS", "TRAIN_ERRORS"]


@dataclass(frozen=True)
class Job:
    """What the units of work and the executors read of a sweep, built by
    :func:`.engine.job_of` from the sweep's configuration (each field is the
    :class:`~.plan.SweepConfig` field of the same name); a Ray worker is sent this."""

    out: Path  # the output folder: checkpoints and model files go under it
    device: str = "cpu"
    data_dir: Path | None = None
    download: bool = False
    backend: str = "auto"  # the stacked trainer's backend
    graphs: str = "auto"  # the step as a CUDA graph
    compile: bool = False
    save_models: bool = False
    checkpoint_every: str | None = "10m"  # --checkpoint-every (None or "0": never)
    group_size: int | None = None  # most runs trained together (None: all of an architecture)


def load_data(job: Job, ds: str) -> ImageData:
    """Dataset ``ds`` on the job's device, from its ``data_dir`` (downloaded if it allows)."""
    return load_dataset(ds, data_dir=job.data_dir, download=job.download, device=job.device)


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
    is the :class:`~prewarm_gpu.training.checkpoint.Checkpointer` of the training under way."""

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


def checkpoint_policy(job: Job, group: Sequence[RunSpec]) -> CheckpointPolicy | None:
    """``<out>/checkpoints/<dataset>-<hash of the group's keys>.pt``, or None when disabled."""
    every_steps, every_seconds = parse_every(job.checkpoint_every)
    if every_steps is None and every_seconds is None:
        return None
    return CheckpointPolicy(job.out / CHECKPOINTS / checkpoint_name(group), every_steps,
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
    together with :func:`prewarm_gpu.training.loop.train_batched`; one record per spec, in order.

    A run whose initialisation raises one of :data:`INIT_ERRORS` is recorded as failed alone; if
    the batched training raises one of :data:`TRAIN_ERRORS`, every run of the batch is recorded as
    failed with the error (the sweep goes on). Other exceptions propagate. With ``checkpoint``,
    the batch is checkpointed as it trains and continues from a checkpoint found."""
    from ..training.loop import train_batched

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
    chosen = None  # the backend that trains them, recorded with each run
    if built:
        models = [b[1] for b in built]
        chosen = choose_backend(backend, models, data.device)
        step_progress = _StepCounter(progress)
        try:
            results = train_batched(models, data, built[0][0].train,
                                    seeds=[b[0].seed for b in built],
                                    precision=built[0][0].precision, backend=chosen,
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
        records[spec.key].update(trainer="batched", backend=chosen)
    return [records[s.key] for s in specs]


def run_group(job: Job, group: Sequence[RunSpec], data: ImageData,
              progress: Callable[[int], None] | None = None,
              checkpoint: CheckpointPolicy | None = None) -> list[dict[str, Any]]:
    """Train one group of runs (the unit an executor runs: :func:`run_batch` for several, else
    :func:`run_one`); their records, in order, without the environment."""
    if len(group) > 1:
        records = run_batch(group, data, progress=progress, backend=job.backend,
                            graphs=job.graphs, compile=job.compile,
                            save_dir=job.out if job.save_models else None,
                            checkpoint=checkpoint)
    else:
        spec = group[0]
        records = [run_one(spec, data, progress=progress, checkpoint=checkpoint,
                           graphs=job.graphs, compile=job.compile,
                           save_to=model_path(job.out, spec) if job.save_models else None)]
        records[0].update(trainer="single", backend="loop")  # train(): one run, its own kernels
    for rec in records:  # which data the run saw, so two folders can be shown to share it
        rec["data_fingerprint"] = data.fingerprint
    return records
