"""The output folder's files: run records in ``results.jsonl``, trained models, atomic writes.

``results.jsonl`` holds one JSON object per finished run (ok or failed), appended, flushed and
fsync'd when the run ends; a corrupt or truncated line is moved aside, never an error. Trained
models are ``models/<dataset>-<init>-<seed>.pt`` (:func:`model_path`; :func:`trained_models` finds
them again, for :func:`build_bank_from_runs`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .jsonable import jsonable
from .plan import BASELINE, DEFAULT_ARCH, RunSpec

if TYPE_CHECKING:
    from ..training.protocol import TrainResult

RESULTS, SUMMARY, TABLE = "results.jsonl", "summary.json", "table.md"
CHECKPOINTS = "checkpoints"  # in-run checkpoints, removed when their runs are recorded
LOCK = ".lock"  # one writer per output folder
MODELS_DIR = "models"


class ResultsWriteError(OSError):
    """Writing ``--out`` failed (read-only, disk full): what was written before is intact."""


# --- model files ---------------------------------------------------------------------------------

def save_model(model: nn.Module, path: Path) -> None:
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
    return out / MODELS_DIR / f"{spec.dataset}-{init}-{spec.seed}.pt"


def make_record(spec: RunSpec, r: TrainResult, report: dict, init_seconds,
                seconds) -> dict[str, Any]:
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
        "init_report": jsonable(report),
        "train_seconds": r.seconds,
        "init_seconds": init_seconds,
        "seconds": seconds,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def trained_models(out: str | os.PathLike, dataset: str | None = None,
                   init: str | None = None) -> list[Path]:
    """The ``models/<dataset>-<init>-<seed>.pt`` files of an output folder (:func:`model_path`'s
    names), sorted, filtered by dataset and init (``None``: any)."""
    picked = []
    for f in sorted(Path(out, MODELS_DIR).glob("*.pt")):
        parts = f.stem.rsplit("-", 2)  # a dataset name may contain '-'; init and seed may not
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        ds, ini, _ = parts
        if (dataset is None or ds == dataset) and (init is None or ini == init):
            picked.append(f)
    return picked


def build_bank_from_runs(run_dir: str | os.PathLike, *, dataset: str | None = None,
                         init: str | None = None, **options) -> dict[str, Any]:
    """:func:`prewarm_gpu.methods.filterbank.build_bank` from a sweep's trained models
    (``reproduce --save-models``).

    Reads the state dicts ``<run_dir>/models/<dataset>-<init>-<seed>.pt`` (``torch.save``).

    Args:
        run_dir: the sweep's output folder (``--out``).
        dataset, init: keep only the runs of this dataset / initialisation (default: all).
        **options: :func:`build_bank`'s keywords (``n_clusters``, ``variant``, ``layers``,
            ``generator``).
    """
    from ..methods.filterbank import build_bank

    files = trained_models(run_dir, dataset, init)
    if not files:
        raise ValueError(
            f"no trained models in {Path(run_dir, 'models')} (looked for "
            f"<dataset>-<init>-<seed>.pt, dataset={dataset!r}, init={init!r})"
        )
    bank = build_bank(files, **options)
    bank["sources"] = [f.name for f in files]
    return bank


# --- environment ---------------------------------------------------------------------------------

def git_commit() -> str | None:
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

    from .. import __version__

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
        "git_commit": git_commit(),
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
    write_atomic(path, b"".join(b + b"\n" for b in good))
    return len(bad)


def append_result(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, then flush and fsync: a finished run survives a crash.

    A file that does not end in a newline (a truncated last line) gets one first, so the new record
    starts on its own line. The record goes through :func:`.jsonable.jsonable` first, as every
    output file does: a NaN or Inf that reaches it is written as ``null`` (strict JSON), so a
    trained run is never lost to the encoder.
    """
    line = json.dumps(jsonable(record), allow_nan=False) + "\n"
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


def write_atomic(path: Path, data: str | bytes) -> None:
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


def latest_by_key(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Last record per key (a retried failed run supersedes the failure)."""
    return {r["key"]: r for r in records}


def is_done(rec: dict[str, Any] | None, retry_failed: bool) -> bool:
    """Whether a run's latest record means it need not run again: ok, or failed without
    ``--retry-failed``."""
    return rec is not None and (rec.get("status") == "ok" or not retry_failed)
