"""Which backend trains which models, which one ``auto`` picks, and the stack that runs it.

A backend is a name in :data:`BACKENDS` and a stack class (:mod:`prewarm_gpu.training.stacks`).
:func:`usable` says which backends can train a set of models, :func:`choose_backend` checks a
requested name (``auto``: the fastest in a table of measured speeds), and :func:`make_stack`
builds the chosen stack.

The speed table is data passed in, never a global that changes: :data:`MEASURED` is the built-in
table (read-only), and :func:`load_measured` returns a new table (the built-in one updated by a
benchmark's JSON) for the caller to pass to :func:`choose_backend`, whose pick then goes to
:func:`prewarm_gpu.training.loop.train_batched` as ``backend=``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import nn

from ..models import SimpleCNN
from .stacks import BmmStack, GroupedStack, LoopStack, VmapStack

__all__ = ["BACKENDS", "MEASURED", "load_measured", "usable", "choose_backend", "make_stack"]

BACKENDS = ("auto", "grouped", "vmap", "loop", "bmm")

Speeds = Mapping[str, Mapping[str, float]]  # device type → backend → run-steps per second

# Measured speed of each backend, run-steps per second, SimpleCNN at batch 256: `auto` takes the
# fastest that can train the models. cuda: an H100 (2026-11, cifar10 sizes, fp32, the grouped /
# vmap / loop backends side by side; ../shared/notes/gpu-facts.md). cpu: this project's 2-core
# CPU (16 runs on digits, 30 steps, one thread: loop 8.8 s, grouped 12.4 s, vmap 18.7 s).
MEASURED: Speeds = MappingProxyType({
    "cuda": MappingProxyType({"grouped": 911.0, "vmap": 656.0, "loop": 574.0}),
    "cpu": MappingProxyType({"loop": 54.5, "grouped": 38.7, "vmap": 25.7}),
})


def load_measured(path: str) -> dict[str, dict[str, float]]:
    """:data:`MEASURED` updated by a ``bench_training.py`` (or GPU suite) JSON's ``measured``
    table (run-steps/s per device type and backend), as a new table (``MEASURED`` is
    unchanged): pass it to :func:`choose_backend`, and the name it picks as ``backend=``."""
    with open(path) as f:
        blob = json.load(f)
    table = blob.get("measured") or (blob.get("training") or {}).get("measured")
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path} has no 'measured' table of run-steps/s per backend")
    merged = {device_type: dict(speeds) for device_type, speeds in MEASURED.items()}
    for device_type, speeds in table.items():
        unknown = set(speeds) - set(BACKENDS)
        if unknown:
            raise ValueError(f"{path}: unknown backends {sorted(unknown)}")
        merged.setdefault(device_type, {}).update({b: float(v) for b, v in speeds.items()})
    return merged


def usable(models: list[nn.Module]) -> list[str]:
    """The backends that can train ``models``: auxiliary heads need the loop; the grouped and bmm
    networks are SimpleCNN's."""
    if any(hasattr(m, "aux_logits") for m in models):
        return ["loop"]
    if type(models[0]) is SimpleCNN:
        return ["grouped", "vmap", "loop", "bmm"]
    return ["vmap", "loop"]


def choose_backend(backend: str, models: list[nn.Module], device: torch.device,
                   measured: Speeds = MEASURED) -> str:
    """``backend`` checked against the models; ``auto``: the fastest in ``measured`` (default:
    :data:`MEASURED`) for the device type (the loop where nothing was measured) among those that
    can train them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    can = usable(models)
    if backend == "auto":
        speed = measured.get(torch.device(device).type, {})
        return max(can, key=lambda b: (speed.get(b, 0.0), b == "loop"))
    if backend not in can:
        raise ValueError(f"the {backend} backend cannot train {type(models[0]).__name__}"
                         + (" (auxiliary heads need the loop backend)"
                            if can == ["loop"] else "; it handles SimpleCNN only"))
    return backend


def make_stack(backend: str, models: list[nn.Module], device: torch.device,
               channels_last: bool | None = None, image_size: tuple[int, int] | None = None):
    """The stack for ``backend`` (see :func:`choose_backend`); ``channels_last`` defaults to
    True on the CPU, where it pays; ``image_size`` (H, W) is the data's (the bmm stack needs it)."""
    backend = choose_backend(backend, models, device)
    if backend == "bmm":
        return BmmStack(models, image_size)
    if channels_last is None:
        channels_last = device.type == "cpu"
    if backend == "grouped":
        return GroupedStack(models, channels_last=channels_last)
    if backend == "loop":
        return LoopStack(models, channels_last=channels_last)
    return VmapStack(models)
