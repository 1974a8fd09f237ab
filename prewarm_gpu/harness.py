"""The paper's experiment as a resumable sweep: datasets × seeds × inits, paired on Kaiming.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), §3 and Table 3. For every (dataset, seed) the Kaiming run and each method's run share the
seed's base weights (models are built under a forked, seeded CPU RNG) and its data order (a
``torch.Generator`` on the device), so a pair differs only by the initialisation. A method whose
function has ``requires_model = "<arch>"`` runs on that architecture (:data:`models.MODELS`) and
is paired with a Kaiming run on the same architecture; Kaiming runs once per (architecture, seed).

Output folder (``--out``):

- ``results.jsonl``: one JSON object per finished run (ok or failed), appended, flushed and fsync'd
  when the run ends; a corrupt or truncated line is skipped with a warning.
- ``summary.json``: per dataset and method, the paired statistics and per-seed numbers.
- ``table.md``: Table 3 in Markdown, plus mean steps to the target training loss.
- ``models/<dataset>-<init>-<seed>.pt`` (``--save-models``): trained state dicts, what
  :func:`prewarm_gpu.methods.filterbank.build_bank_from_runs` reads.
- ``filters_<dataset>.png``, ``curves_<dataset>.png`` (``--plot``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import initializers
from .checkpoint import Checkpointer, parse_every
from .data import (
    DATASETS,
    ImageData,
    canonical_name,
    first_batch_indices,
    load_dataset,
    locate,
)
from .models import BASELINES, MODELS, build_model, reinit_
from .stats import MIN_PAIRS_FOR_MARKS, PairedStats, paired_stats, table3_markdown
from .train import TrainConfig, TrainResult, steps_to_target, train

__all__ = [
    "SEEDS",
    "DEFAULT_ARCH",
    "SweepConfig",
    "RunSpec",
    "ResultsExistError",
    "NothingToResumeError",
    "ResultsWriteError",
    "SweepLockedError",
    "sweep_lock",
    "record_problem",
    "SweepInterrupted",
    "plan_runs",
    "build_arm",
    "run_one",
    "read_results",
    "append_result",
    "summarise",
    "render_tables",
    "prepare_sweep",
    "run_sweep",
    "repair_results",
    "environment",
]

SEEDS = (42, 7, 13, 99, 2025, 1, 8, 21)  # §3.3
DEFAULT_ARCH = "simplecnn"
BASELINE = "kaiming"
PROTOCOL = 3  # bump when a change to the training code changes results: old runs then rerun
# 3: one trainer for one run and many, with a fused Adam (results move by float rounding)
RESULTS, SUMMARY, TABLE = "results.jsonl", "summary.json", "table.md"
CHECKPOINTS = "checkpoints"  # in-run checkpoints, removed when their runs are recorded
LOCK = ".lock"  # one writer per output folder


class ResultsExistError(FileExistsError):
    """``--out`` already holds results and ``--resume`` was not given."""


@dataclass
class SweepConfig:
    """One sweep; ``None`` fields take the dataset's Table 1 value."""

    datasets: list[str] = field(default_factory=lambda: ["digits"])
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    inits: list[str] = field(default_factory=lambda: ["kaiming", "prewarm"])
    init_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # init → its keywords
    out: Path = Path("runs/digits")
    device: str = "cpu"
    data_dir: Path | None = None  # None: ./data, else /usr/share/datasets/<name>
    download: bool = False
    resume: bool = False
    retry_failed: bool = False  # with resume: rerun runs recorded as failed
    save_models: bool = False  # write models/<dataset>-<init>-<seed>.pt
    plot: bool = False
    progress: bool = True  # tqdm bar on stderr
    steps: int | None = None  # N (Table 1: 5000; digits: 150)
    batch_size: int = 256
    lr_start: float | None = None
    lr_end: float | None = None
    eval_points: int = 10
    loss_points: int = 100
    aux_weight: float = 0.3
    target_loss: float = 0.5
    channels_last: bool = True  # NHWC model, single-run trainer (both arms alike): ~30 % faster
    batch: bool = True  # train the runs of a dataset together as one stacked model (issue 5)
    precision: str = "fp32"  # fp32 (as the paper) | tf32 | bf16 (autocast; batched trainer)
    backend: str = "auto"  # batched trainer: auto | grouped | vmap | loop (see prewarm_gpu.batched)
    baseline: str = "torch-default"  # models.BASELINES: every conv/linear re-drawn before both arms
    checkpoint_every: str | None = "10m"  # in-run checkpoints: steps ("500"), "10m", "90s"; None
    report_only: bool = False  # rewrite summary, table (and plots) from results.jsonl; train none

    def train_config(self, dataset: str) -> TrainConfig:
        """The protocol for ``dataset``: Table 1's N and learning rates unless overridden."""
        spec = DATASETS[dataset]
        return TrainConfig(
            steps=spec.steps if self.steps is None else self.steps,  # 0 is refused, not 150
            batch_size=self.batch_size,
            lr_start=spec.lr_start if self.lr_start is None else self.lr_start,
            lr_end=spec.lr_end if self.lr_end is None else self.lr_end,
            eval_points=self.eval_points,
            loss_points=self.loss_points,
            aux_weight=self.aux_weight,
            target_loss=self.target_loss,
        )


@dataclass(frozen=True)
class RunSpec:
    """One training run; :attr:`key` identifies it in ``results.jsonl`` (for ``--resume``)."""

    dataset: str
    arch: str
    init: str
    seed: int
    options: tuple[tuple[str, Any], ...]  # the initialiser's keywords, sorted
    train: TrainConfig
    device_type: str  # "cpu"/"cuda": the data order (randperm) depends on it
    channels_last: bool
    precision: str = "fp32"
    baseline: str = "torch-default"  # models.BASELINES: the weights both arms start from

    @property
    def config(self) -> dict[str, Any]:
        """Everything that changes the run's result (``target_loss`` does not: it is recomputed
        from the stored loss curve; ``eval_batch_size`` does not either)."""
        t = asdict(self.train)
        for k in ("target_loss", "eval_batch_size"):
            t.pop(k)
        return {"dataset": self.dataset, "arch": self.arch, "init": self.init,
                "options": _jsonable(dict(self.options)), "train": t,
                "device_type": self.device_type, "channels_last": self.channels_last,
                "precision": self.precision, "baseline": self.baseline, "protocol": PROTOCOL}

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.config, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.init}/seed={self.seed}/{self.config_hash}"

    @property
    def label(self) -> str:
        arch = "" if self.arch == DEFAULT_ARCH else f"@{self.arch}"
        return f"{self.dataset} {self.init}{arch} seed {self.seed}"


# --- planning ------------------------------------------------------------------------------------

def _arch_of(init: str) -> str:
    """The architecture an initialiser needs (its ``requires_model``), else SimpleCNN."""
    return getattr(initializers.get(init), "requires_model", None) or DEFAULT_ARCH


def methods_of(config: SweepConfig) -> list[str]:
    """The non-baseline initialisations, in the order given."""
    return [i for i in dict.fromkeys(config.inits) if i != BASELINE]


@functools.cache
def batchable(arch: str) -> bool:
    """Whether runs of ``arch`` can train stacked: models with auxiliary heads cannot (probed
    once per architecture on a tiny instance)."""
    return not hasattr(build_model(arch, in_channels=1, n_classes=2, image_size=8), "aux_logits")


def _channels_last(config: SweepConfig, arch: str) -> bool:
    """channels_last applies to the single-run trainer only (the batched one stacks weights)."""
    return config.channels_last and not (config.batch and batchable(arch))


def plan_runs(config: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, grouped by dataset then seed, Kaiming first within a seed — so an
    interrupted sweep leaves complete pairs. Kaiming runs once per (architecture, seed)."""
    for init in config.inits:
        initializers.get(init)  # KeyError listing the known names
        initializers.check_options(init, config.init_options.get(init, {}))  # typos: now
    if not config.seeds or any(not isinstance(s, int) or s < 0 for s in config.seeds):
        raise ValueError(f"seeds must be non-negative ints, got {config.seeds}")
    if len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct, got {config.seeds}")
    methods = methods_of(config)
    if not methods:
        raise ValueError(f"nothing to compare: --init needs a method besides {BASELINE!r}, "
                         f"got {config.inits}")
    archs = list(dict.fromkeys(_arch_of(m) for m in methods))
    for arch in archs:
        if arch not in MODELS:
            raise KeyError(f"unknown model {arch!r} (required by an initialiser); known: "
                           f"{sorted(MODELS)}")
    parse_every(config.checkpoint_every)  # ValueError now, not after the first run
    if config.baseline not in BASELINES:
        raise ValueError(f"--baseline must be one of {BASELINES}, got {config.baseline!r}")
    dev = torch.device(config.device).type
    specs = []
    for ds in config.datasets:
        tc = config.train_config(ds)
        for seed in config.seeds:
            for arch in archs:
                specs.append(RunSpec(ds, arch, BASELINE, seed, (), tc, dev,
                                     _channels_last(config, arch), config.precision,
                                     config.baseline))
            for m in methods:
                opts = tuple(sorted(config.init_options.get(m, {}).items()))
                arch = _arch_of(m)
                specs.append(RunSpec(ds, arch, m, seed, opts, tc, dev,
                                     _channels_last(config, arch), config.precision,
                                     config.baseline))
    return specs


# --- one run -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Global RNGs seeded with ``seed`` inside, restored on exit: nothing leaks either way."""
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    else:
        devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_arm(spec: RunSpec, data: ImageData) -> tuple[nn.Module, dict[str, Any]]:
    """Build the seed's model and apply the run's initialisation: ``(model, init report)``.

    The weights are drawn on the CPU under ``torch.manual_seed(seed)`` (forked RNG), whatever the
    device, then re-drawn as ``spec.baseline`` (:func:`prewarm_gpu.models.reinit_`, a CPU
    generator seeded with the seed) when that is not PyTorch's default. Pre-Warm and other
    data-dependent methods see the seed's first training batch
    (standardised, plus the raw [0, 1] pixels), with ``generator=seed``.
    """
    s = data.spec
    with _seeded(spec.seed, torch.device("cpu")):
        model = build_model(spec.arch, in_channels=s.in_channels, n_classes=s.n_classes,
                            image_size=s.image_size)
    reinit_(model, spec.baseline, generator=torch.Generator().manual_seed(spec.seed))
    model = model.to(data.device)
    idx = first_batch_indices(data.train_x.shape[0], spec.train.batch_size, spec.seed, data.device)
    batch = {"images": data.standardise(data.train_x[idx]), "raw": data.raw(data.train_x[idx])}
    fn = initializers.get(spec.init)
    with _seeded(spec.seed, data.device):
        report = fn(model, data=batch, generator=spec.seed, **dict(spec.options))
    return model, report or {}


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
    digest = hashlib.sha256("\n".join(s.key for s in group).encode()).hexdigest()[:16]
    return CheckpointPolicy(config.out / CHECKPOINTS / f"{group[0].dataset}-{digest}.pt",
                            every_steps, every_seconds)


def run_one(spec: RunSpec, data: ImageData, *, progress: Callable[[int], None] | None = None,
            save_to: Path | None = None,
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
                           channels_last=spec.channels_last, progress=step_progress,
                           checkpoint=checkpoint.open([spec]) if checkpoint else None)
        except TRAIN_ERRORS as e:
            result = _failed("training: ", e)
        if save_to is not None and result.status == "ok":
            _save_model(model, save_to)
    if result.status != "ok":
        step_progress.finish(spec.train.steps)
    return _record(spec, result, report, init_seconds, time.perf_counter() - t0)


def run_batch(specs: Sequence[RunSpec], data: ImageData, *,
              progress: Callable[[int], None] | None = None, backend: str = "auto",
              save_dir: Path | None = None,
              checkpoint: CheckpointPolicy | None = None) -> list[dict[str, Any]]:
    """Build and initialise every run of ``specs`` (one dataset, one architecture), train them
    together with :func:`prewarm_gpu.batched.train_batched`; one record per spec, in order.

    A run whose initialisation raises one of :data:`INIT_ERRORS` is recorded as failed alone; if
    the batched training raises one of :data:`TRAIN_ERRORS`, every run of the batch is recorded as
    failed with the error (the sweep goes on). Other exceptions propagate. With ``checkpoint``,
    the batch is checkpointed as it trains and continues from a checkpoint found."""
    from .batched import train_batched

    records: dict[str, dict[str, Any]] = {}
    built = []
    for spec in specs:
        t0 = time.perf_counter()
        try:
            model, report = build_arm(spec, data)
            built.append((spec, model, report, time.perf_counter() - t0))
        except INIT_ERRORS as e:
            records[spec.key] = _record(spec, _failed("", e), {}, None, time.perf_counter() - t0)
            _StepCounter(progress).finish(spec.train.steps)
    if built:
        step_progress = _StepCounter(progress)
        try:
            results = train_batched([b[1] for b in built], data, built[0][0].train,
                                    seeds=[b[0].seed for b in built],
                                    precision=built[0][0].precision, backend=backend,
                                    progress=step_progress,
                                    checkpoint=checkpoint.open([b[0] for b in built])
                                    if checkpoint else None)
        except TRAIN_ERRORS as e:
            results = [_failed("batched training: ", e) for _ in built]
            step_progress.finish(sum(b[0].train.steps for b in built))
        for (spec, model, report, init_s), r in zip(built, results, strict=True):
            if save_dir is not None and r.status == "ok":
                _save_model(model, model_path(save_dir, spec))
            records[spec.key] = _record(spec, r, report, init_s, init_s + r.seconds)
    for spec in specs:
        records[spec.key]["trainer"] = "batched"
    return [records[s.key] for s in specs]


def _groups(specs: Sequence[RunSpec], batch: bool) -> list[list[RunSpec]]:
    """Runs that train together: with ``batch``, all runs of a batchable architecture (in plan
    order); every other run alone."""
    if not batch:
        return [[s] for s in specs]
    groups: dict[str, list[RunSpec]] = {}
    out: list[list[RunSpec]] = []
    for s in specs:
        if batchable(s.arch):
            if s.arch not in groups:
                groups[s.arch] = []
                out.append(groups[s.arch])
            groups[s.arch].append(s)
        else:
            out.append([s])
    return out


def _save_model(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".part")
    torch.save(state, tmp)
    os.replace(tmp, path)


def model_path(out: Path, spec: RunSpec) -> Path:
    """``models/<dataset>-<init>-<seed>.pt``; a Kaiming baseline on another architecture is
    ``<dataset>-kaiming+<arch>-<seed>.pt`` (dashes of the arch as underscores)."""
    init = spec.init
    if spec.init == BASELINE and spec.arch != DEFAULT_ARCH:
        init = f"{BASELINE}+{spec.arch.replace('-', '_')}"
    return out / "models" / f"{spec.dataset}-{init}-{spec.seed}.pt"


def _record(spec: RunSpec, r: TrainResult, report: dict, init_seconds, seconds) -> dict[str, Any]:
    return {
        "key": spec.key,
        "dataset": spec.dataset,
        "arch": spec.arch,
        "init": spec.init,
        "seed": spec.seed,
        "config": spec.config,
        "config_hash": spec.config_hash,
        "status": r.status,
        "error": r.error,
        "traceback": r.traceback,
        "failed_step": r.failed_step,
        "accuracy": r.accuracy,
        "steps_to_target": r.steps_to_target,
        "target_loss": spec.train.target_loss,
        "curves": {"loss_steps": r.loss_steps, "loss": r.loss,
                   "acc_steps": r.acc_steps, "test_acc": r.test_acc},
        "init_report": _jsonable(report),
        "train_seconds": r.seconds,
        "init_seconds": init_seconds,
        "seconds": seconds,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(x: Any) -> Any:
    """Plain JSON: tensors and arrays → lists (large ones → a shape summary), NaN/Inf → None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        if arr.size > 1024:
            return {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        return _jsonable(arr.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


# --- environment ---------------------------------------------------------------------------------

def _git_commit() -> str | None:
    """The commit of the source tree this package runs from; ``None`` when unknown."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001 — no git, not a checkout, …: the record says None
        return None


def environment(device: str | torch.device) -> dict[str, Any]:
    """Versions, device and commit, recorded with every run."""
    import scipy
    import sklearn
    import torchvision

    from . import __version__

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or None
    return {
        "prewarm_gpu": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": name,
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }


# --- results file --------------------------------------------------------------------------------

def record_problem(rec: Any) -> str | None:
    """Why a parsed line of ``results.jsonl`` is not a usable run record, or None. A record must
    name its run (a string ``key``), its ``status`` (ok/failed), its ``config`` and ``curves``;
    an ok record needs a finite accuracy in [0, 1]."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("key"), str):
        return "no string 'key'"
    if rec.get("status") not in ("ok", "failed"):
        return f"status {rec.get('status')!r} is neither 'ok' nor 'failed'"
    for field_ in ("config", "curves"):
        if not isinstance(rec.get(field_), dict):
            return f"no {field_!r} object"
    if rec["status"] == "ok":
        acc = rec.get("accuracy")
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or \
                not (math.isfinite(acc) and 0 <= acc <= 1):
            return f"an ok run without a finite accuracy in [0, 1] (got {acc!r})"
    return None


def _parse_record(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        rec = json.loads(line)
    except ValueError as e:
        return None, str(e)
    problem = record_problem(rec)
    return (None, problem) if problem else (rec, None)


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every valid record of ``results.jsonl``; a corrupt or truncated line (a run killed while
    writing) is skipped with a warning, never an error."""
    if not path.exists():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec, problem = _parse_record(line)
        if problem:
            where = "last line" if i >= len(lines) - 1 else f"line {i}"
            warnings.warn(f"{path}: ignoring corrupt or truncated {where} ({problem}); that run "
                          "will be run again", stacklevel=2)
            continue
        records.append(rec)
    return records


def repair_results(path: Path) -> int:
    """Move every corrupt or truncated line of ``results.jsonl`` to ``results.jsonl.torn``
    (appended) and rewrite the file atomically without them, so that it is valid JSON lines again.
    Returns the number of lines moved (0: the file is left as it is)."""
    if not path.exists():
        return 0
    good, bad = [], []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        (bad if _parse_record(line)[1] else good).append(line)
    if not bad:
        return 0
    torn = path.with_name(path.name + ".torn")
    with open(torn, "ab") as f:
        f.write(b"".join(b + b"\n" for b in bad))
        f.flush()
        os.fsync(f.fileno())
    _write_atomic(path, b"".join(b + b"\n" for b in good))
    return len(bad)


def append_result(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, then flush and fsync: a finished run survives a crash.

    A file that does not end in a newline (a truncated last line) gets one first, so the new record
    starts on its own line.
    """
    line = json.dumps(record, allow_nan=False) + "\n"
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):  # leave no torn line behind
            os.truncate(path, size)
        raise ResultsWriteError(f"could not write {path}: {e}") from e


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` by ``data`` atomically (a ``.part`` file, fsync'd, then renamed)."""
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ResultsWriteError(f"could not write {path}: {e}") from e


def _latest(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Last record per key (a retried failed run supersedes the failure)."""
    return {r["key"]: r for r in records}


# --- summary -------------------------------------------------------------------------------------

def _steps_to_target(rec: dict[str, Any], target: float) -> int | None:
    """:func:`prewarm_gpu.train.steps_to_target` of a record's stored loss curve."""
    c = rec.get("curves") or {}
    return steps_to_target(c.get("loss_steps", []), c.get("loss", []), target)


def summarise(config: SweepConfig, specs: Sequence[RunSpec],
              records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Paired statistics per (dataset, method) from the records of this sweep's runs."""
    latest = _latest(records)
    by_key = {s.key: latest.get(s.key) for s in specs}
    out: dict[str, Any] = {"datasets": {}}
    for ds in config.datasets:
        mine = [s for s in specs if s.dataset == ds]
        entry: dict[str, Any] = {"title": DATASETS[ds].title,
                                 "train": asdict(config.train_config(ds)),
                                 "protocol": _protocol(config, ds), "methods": {},
                                 "failed": [], "missing": []}
        for s in mine:
            rec = by_key[s.key]
            if rec is None:
                entry["missing"].append(s.label)
            elif rec["status"] != "ok":
                entry["failed"].append({"run": s.label, "error": rec.get("error"),
                                        "failed_step": rec.get("failed_step")})
        for m in methods_of(config):
            entry["methods"][m] = _method_summary(config, mine, by_key, m)
        out["datasets"][ds] = entry
    return out


BASELINE_NAMES = {
    "torch-default": "PyTorch's default init, kaiming_uniform_(a=√5): std 1/√(3·fan_in)",
    "he-normal": "He et al. 2015 normal: std √(2/fan_in), biases 0",
    "he-uniform": "He et al. 2015 uniform: std √(2/fan_in), biases 0",
}


def _protocol(config: SweepConfig, ds: str) -> dict[str, Any]:
    """What a reader needs to know a table's numbers came from: steps, seeds, precision, device,
    baseline (the table's caption)."""
    tc = config.train_config(ds)
    return {"steps": tc.steps, "batch_size": tc.batch_size, "lr": [tc.lr_start, tc.lr_end],
            "seeds": list(config.seeds), "precision": config.precision,
            "device": str(config.device), "baseline": config.baseline}


def _caption(title: str, p: dict[str, Any]) -> str:
    seeds = " ".join(map(str, p["seeds"]))
    return (f"{title}: {p['steps']} steps, batch {p['batch_size']}, lr {p['lr'][0]:g}→"
            f"{p['lr'][1]:g}, {len(p['seeds'])} seeds ({seeds}), {p['precision']}, device "
            f"{p['device']}; \"Kaiming\" is the baseline {p['baseline']} "
            f"({BASELINE_NAMES[p['baseline']]}).")


def _method_summary(config, specs, by_key, method) -> dict[str, Any]:
    arch = _arch_of(method)
    base = {s.seed: by_key[s.key] for s in specs if s.init == BASELINE and s.arch == arch}
    meth = {s.seed: by_key[s.key] for s in specs if s.init == method}
    seeds = [sd for sd in config.seeds
             if _ok(base.get(sd)) and _ok(meth.get(sd))]
    k_acc = [base[sd]["accuracy"] for sd in seeds]
    m_acc = [meth[sd]["accuracy"] for sd in seeds]
    t = config.target_loss
    res: dict[str, Any] = {
        "arch": arch,
        "seeds": seeds,
        "kaiming_acc": k_acc,
        "method_acc": m_acc,
        "target_loss": t,
        "kaiming_steps_to_target": [_steps_to_target(base[sd], t) for sd in seeds],
        "method_steps_to_target": [_steps_to_target(meth[sd], t) for sd in seeds],
        "stats": paired_stats(m_acc, k_acc).as_dict() if seeds else None,
    }
    return res


def _ok(rec: dict[str, Any] | None) -> bool:
    return rec is not None and rec.get("status") == "ok" and rec.get("accuracy") is not None


def _stats_of(d: dict[str, Any]) -> PairedStats:
    return PairedStats(**{k: (math.nan if v is None else v) for k, v in d.items()})


def _mean_steps(steps: Sequence[int | None]) -> str:
    hit = [s for s in steps if s is not None]
    if not hit:
        return f"never (0/{len(steps)})"
    return f"{np.mean(hit):.0f} ({len(hit)}/{len(steps)})"


def render_tables(summary: dict[str, Any]) -> str:
    """Table 3 (Markdown) and the convergence table, with footnotes."""
    rows, conv, notes, captions = [], [], [], []
    target = None
    for entry in summary["datasets"].values():
        if "protocol" in entry:
            captions.append(_caption(entry["title"], entry["protocol"]))
        for m, ms in entry["methods"].items():
            arch = "" if ms["arch"] == DEFAULT_ARCH else f" ({ms['arch']})"
            if ms["stats"] is not None:
                rows.append((entry["title"], m + arch, _stats_of(ms["stats"])))
            target = ms["target_loss"]
            k_steps = _mean_steps(ms["kaiming_steps_to_target"])
            m_steps = _mean_steps(ms["method_steps_to_target"])
            conv.append(f"| {entry['title']} | {m}{arch} | {k_steps} | {m_steps} |")
        for f in entry["failed"]:
            step = f" at step {f['failed_step']}" if f.get("failed_step") else ""
            notes.append(f"- failed: {f['run']}{step}: {f['error']}")
        if entry["missing"]:
            notes.append(f"- not run yet ({len(entry['missing'])}): {', '.join(entry['missing'])}")
    parts = [table3_markdown(rows) if rows else "(no finished pairs yet)", "", *captions,
             "",
             "Accuracy: final test accuracy, mean ± sample std (ddof=1) over seeds; Δacc: mean "
             "paired difference (method − Kaiming); Δerr% = −Δacc / (1 − mean Kaiming acc); p: "
             "one-sided paired t-test (method > Kaiming), * p<0.1, ** p<0.05, *** p<0.01, marked "
             f"only from n ≥ {MIN_PAIRS_FOR_MARKS} pairs; n/a: undefined (fewer than 2 pairs, or "
             "every paired difference equal); wins: seeds where the method is strictly ahead; "
             "Wilcoxon p: one-sided signed-rank test of the same pairs; 95 % CI Δacc: paired "
             "bootstrap (BCa, 9999 resamples, fixed seed; n ≥ 3); p (Holm): the t-test's p "
             "adjusted across this table's datasets, per method."]
    if conv:
        parts += ["", f"| Dataset | Method | steps to loss < {target:g}, Kaiming | method |",
                  "| --- | --- | ---: | ---: |", *conv, "",
                  "Steps to target: first curve point (window-mean training loss) below the "
                  "target; mean over the seeds that reached it (reached/pairs)."]
    if notes:
        parts += ["", *notes]
    return "\n".join(parts)


def write_summary(config: SweepConfig, specs: Sequence[RunSpec], records, env) -> str:
    """Write ``summary.json`` and ``table.md`` (atomically); return the tables."""
    summary = summarise(config, specs, records)
    table = render_tables(summary)
    summary.update(
        table_markdown=table,
        sweep={"datasets": config.datasets, "seeds": config.seeds, "inits": config.inits,
               "init_options": _jsonable(config.init_options), "device": config.device,
               "runs": len(specs)},
        env=env,
        written_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    text = json.dumps(_jsonable(summary), indent=2, ensure_ascii=False)
    _write_atomic(config.out / SUMMARY, text + "\n")
    _write_atomic(config.out / TABLE, table + "\n")
    return table


# --- the sweep -----------------------------------------------------------------------------------

class NothingToResumeError(FileNotFoundError):
    """``--resume`` was given but ``--out`` holds no finished run."""


class ResultsWriteError(OSError):
    """Writing ``--out`` failed (read-only, disk full): what was written before is intact."""


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
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise SweepLockedError(f"{out} is in use by another prewarm-gpu (pid {owner}); wait "
                                   "for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


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
        locate(ds, config.data_dir)  # raises, naming every place looked at (digits: no files)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # in a log file, a line every 10 s rather than every 0.5 s
    return tqdm(total=total, unit="step", desc="sweep", dynamic_ncols=True,
                mininterval=0.5 if tty else 10.0, smoothing=0.05, file=sys.stderr)


def prepare_sweep(config: SweepConfig) -> tuple[SweepConfig, list[RunSpec]]:
    """Every check that needs no training, in the order a user would want the errors: the plan
    (names, options, seeds, steps), the output folder, matplotlib for ``--plot``, the data.

    Returns the normalised config and its runs. Raises the errors :func:`run_sweep` documents.
    """
    config = replace(config, datasets=[canonical_name(d) for d in config.datasets],
                     out=Path(config.out))
    specs = plan_runs(config)
    _check_out(config)
    if config.plot:
        _import_pyplot()  # fail now, not after training
    _check_data(config)
    _check_writable(config.out)
    return config, specs


def run_sweep(config: SweepConfig, *, log: Callable[[str], None] | None = None,
              after_run: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Run every missing run of the sweep, writing results as they finish; return the tables.

    Args:
        config: the sweep.
        log: where to print progress lines (default: stderr).
        after_run: called with each finished record (tests use it to simulate interruption).

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
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    config, specs = prepare_sweep(config)
    with sweep_lock(config.out):
        return _run_sweep(config, specs, log, after_run)


def _run_sweep(config: SweepConfig, specs: list[RunSpec], log, after_run) -> str:
    path = config.out / RESULTS
    moved = repair_results(path)
    if moved:
        log(f"moved {moved} corrupt or truncated line(s) of {path} to {path.name}.torn; those "
            "runs will be run again")
    records = read_results(path)
    latest = _latest(records)
    todo = [] if config.report_only else \
        [s for s in specs if not _done(latest.get(s.key), config.retry_failed)]
    env = environment(config.device)
    if config.resume:
        log(f"resume: {len(specs) - len(todo)} of {len(specs)} runs already in {path}; "
            f"running the other {len(todo)}")
    bar = _progress_bar(sum(s.train.steps for s in todo), config.progress and bool(todo))
    state: dict[str, Any] = {"written": 0, "in_flight": [], "checkpoint": None}
    try:
        for ds in config.datasets:
            mine = [s for s in todo if s.dataset == ds]
            if not mine and not (config.plot and _has_ok(latest, ds)):
                continue
            data = load_dataset(ds, data_dir=config.data_dir, download=config.download,
                                device=config.device)
            if data.source is not None:
                log(f"{ds}: read from {data.source}")
            update = bar.update if bar is not None else None
            for group in _groups(mine, config.batch):
                ckpt = checkpoint_policy(config, group)
                state["in_flight"], state["checkpoint"] = group, ckpt
                if bar is not None:
                    bar.set_postfix_str(group[0].label if len(group) == 1 else
                                        f"{ds}: {len(group)} runs batched", refresh=False)
                if len(group) > 1:
                    recs = run_batch(group, data, progress=update, backend=config.backend,
                                     save_dir=config.out if config.save_models else None,
                                     checkpoint=ckpt)
                else:
                    spec = group[0]
                    recs = [run_one(spec, data, progress=update, checkpoint=ckpt,
                                    save_to=model_path(config.out, spec)
                                    if config.save_models else None)]
                    recs[0]["trainer"] = "single"
                for spec, rec in zip(group, recs, strict=True):
                    rec["env"] = env
                    append_result(path, rec)
                    records.append(rec)
                    state["written"] += 1
                    state["in_flight"] = [s for s in state["in_flight"] if s is not spec]
                    if rec["status"] != "ok":
                        log(f"run failed: {spec.label}: {rec['error']}")
                    if after_run is not None:
                        after_run(rec)
                state["in_flight"], state["checkpoint"] = [], None
                if ckpt is not None:
                    ckpt.remove()  # its runs are recorded
                write_summary(config, specs, records, env)
            if config.plot:
                plot_filters(config, specs, data)
            del data
    except KeyboardInterrupt as e:
        write_summary(config, specs, records, env)
        raise SweepInterrupted(_interrupted(config, specs, records, state)) from e
    finally:
        if bar is not None:
            bar.close()
    table = write_summary(config, specs, records, env)
    if config.plot:
        plot_curves(config, specs, records)
    return table


def _interrupted(config: SweepConfig, specs: Sequence[RunSpec], records, state) -> str:
    """What an interruption kept and lost, exactly."""
    latest = _latest(records)
    kept = sum(1 for s in specs if s.key in latest)
    path = config.out / RESULTS
    parts = [f"{kept} of {len(specs)} runs are finished and kept in {path} "
             f"({state['written']} written by this command)."]
    lost = state["in_flight"]
    ckpt = state["checkpoint"]
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


# --- plots ---------------------------------------------------------------------------------------

def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'prewarm-gpu[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _filter_grid(w: torch.Tensor, cols: int = 8) -> np.ndarray:
    """conv1 weights (F, C, k, k) → one image of F filters in rows of ``cols``, 1-pixel white gaps,
    each filter min-max scaled to [0, 1]; (H, W, 3) for C = 3, else (H, W) of channel 0."""
    w = w.detach().float().cpu()
    F_, C, kh, kw = w.shape
    flat = w.reshape(F_, -1)
    lo, hi = flat.min(1).values.view(F_, 1, 1, 1), flat.max(1).values.view(F_, 1, 1, 1)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    shown = w if C == 3 else w[:, :1]
    rows = -(-F_ // cols)
    canvas = torch.ones(rows * (kh + 1) - 1, cols * (kw + 1) - 1, shown.shape[1])
    for f in range(F_):
        r, c = divmod(f, cols)
        canvas[r * (kh + 1) : r * (kh + 1) + kh, c * (kw + 1) : c * (kw + 1) + kw] = \
            shown[f].permute(1, 2, 0)
    img = canvas.numpy()
    return img if C == 3 else img[..., 0]


def plot_filters(config: SweepConfig, specs: Sequence[RunSpec], data: ImageData) -> Path | None:
    """``filters_<dataset>.png``: conv1 at initialisation, Kaiming next to each method (first
    seed). Pre-Warm's conditioned filters are the first ``n_clusters`` (top rows)."""
    plt = _import_pyplot()
    seed = config.seeds[0]
    mine = [s for s in specs if s.dataset == data.spec.name and s.seed == seed]
    panels = []
    for s in mine:
        try:
            model, _ = build_arm(s, data)
        except Exception as e:  # noqa: BLE001 — a plot must not end the sweep
            warnings.warn(f"filter plot: {s.label}: {e}", stacklevel=2)
            continue
        conv = getattr(model, "conv1", None)
        if isinstance(conv, nn.Conv2d):
            panels.append((s.init if s.arch == DEFAULT_ARCH else f"{s.init} ({s.arch})",
                           _filter_grid(conv.weight)))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.4), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels, strict=True):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    fig.suptitle(f"{data.spec.title}: conv1 at initialisation (seed {seed}; each filter min-max "
                 "scaled)", fontsize=10)
    path = config.out / f"filters_{data.spec.name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(config: SweepConfig, specs: Sequence[RunSpec],
                records: Sequence[dict[str, Any]]) -> list[Path]:
    """``curves_<dataset>.png``: mean test accuracy (± std band over seeds) and training loss."""
    plt = _import_pyplot()
    latest = _latest(records)
    paths = []
    for ds in config.datasets:
        groups: dict[str, list[dict[str, Any]]] = {}
        for s in specs:
            rec = latest.get(s.key)
            if s.dataset == ds and _ok(rec):
                name = s.init if s.arch == DEFAULT_ARCH else f"{s.init} ({s.arch})"
                groups.setdefault(name, []).append(rec)
        if not groups:
            continue
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, recs in groups.items():
            for ax, xs, ys in ((ax_acc, "acc_steps", "test_acc"), (ax_loss, "loss_steps", "loss")):
                x = recs[0]["curves"][xs]
                same = [r for r in recs if r["curves"][xs] == x]
                if len(same) < len(recs):
                    warnings.warn(f"curves_{ds}.png: {len(recs) - len(same)} {name} run(s) have "
                                  f"other {xs} than the first; drawn without them", stacklevel=2)
                y = np.array([r["curves"][ys] for r in same], dtype=float)
                mean, std = y.mean(0), y.std(0)
                (line,) = ax.plot(x, mean, label=f"{name} (n={len(y)})")
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax_acc.set(xlabel="step", ylabel="test accuracy", title="test accuracy (mean ± std)")
        accs = [a for g in groups.values() for r in g for a in r["curves"]["test_acc"][1:]]
        if accs:  # zoom past step 0's chance level
            ax_acc.set_ylim(max(0.0, min(accs) - 0.01), min(1.0, max(accs)) + 0.005)
        ax_loss.set(xlabel="step", ylabel="training loss (window mean)", yscale="log",
                    title="training loss (mean ± std)")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(DATASETS[ds].title)
        path = config.out / f"curves_{ds}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
