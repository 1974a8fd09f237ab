"""What "fp32" and "tf32" mean inside the trainer and the initialisers' forward passes.

PyTorch's defaults let cuDNN run float32 convolutions in TF32 (10-bit mantissas) on Ampere and later
GPUs, so without a scope an "fp32" run on an H100 is not the IEEE arithmetic of the paper's T4.
:func:`float32_scope` sets, for the duration of a ``with`` block,

- ``"ieee"``: IEEE float32 for cuDNN convolutions (and RNNs), cuBLAS matmuls and oneDNN (CPU)
  convolutions and matmuls;
- ``"tf32"``: TF32 for cuDNN and cuBLAS (oneDNN is left as the caller had it: TF32 is a CUDA
  format, and the CPU runs fp32 either way);

and, in both, ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False`` (cuDNN picks
deterministic algorithms, so a CUDA run repeats bit for bit). On exit every flag is back to
exactly what the caller had. The flags cost nothing on the CPU, so the CPU sets them too (and the
tests observe them there).

One API per torch version: where torch has the per-backend ``fp32_precision`` attributes (torch
≥ 2.9; checked by ``hasattr``), only they are read and written; older torch uses the legacy
``allow_tf32`` booleans. The two must not be mixed: once a new-API value is set, reading a legacy
``allow_tf32`` raises ("a mix of the legacy and new APIs"), so inside the scope read the state
with :func:`float32_state`, not with ``torch.backends.cudnn.allow_tf32``.

The trainer's three precisions (:data:`PRECISIONS`) are a float32 mode (:func:`float32_mode`) plus,
for ``"bf16"``, an autocast region around each forward pass (:func:`forward_autocast`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["FP32_MODES", "PRECISIONS", "float32_mode", "float32_scope", "float32_state",
           "forward_autocast", "uses_new_api"]

FP32_MODES = ("ieee", "tf32")
PRECISIONS = ("fp32", "tf32", "bf16")  # the trainer's precisions

_B = torch.backends
# The new API's knobs: (backend module, attribute holder), by name.
_NEW = {
    "cudnn.conv": lambda: _B.cudnn.conv,
    "cudnn.rnn": lambda: _B.cudnn.rnn,
    "cuda.matmul": lambda: _B.cuda.matmul,
    "mkldnn.conv": lambda: _B.mkldnn.conv,
    "mkldnn.matmul": lambda: _B.mkldnn.matmul,
}
_CUDA_KNOBS = ("cudnn.conv", "cudnn.rnn", "cuda.matmul")  # the ones "tf32" turns on


def _holder(name: str):
    try:
        return _NEW[name]()
    except AttributeError:
        return None


def uses_new_api() -> bool:
    """Whether this torch has the per-backend ``fp32_precision`` attributes (torch ≥ 2.9)."""
    return all(hasattr(_holder(n), "fp32_precision") for n in _CUDA_KNOBS)


def float32_state() -> dict[str, object]:
    """The flags :func:`float32_scope` sets, read with the API it uses (safe inside the scope).

    New API: ``{"cudnn.conv": "ieee" | "tf32" | "none", …, "deterministic", "benchmark"}``;
    legacy: ``{"cudnn.allow_tf32": bool, "cuda.matmul.allow_tf32": bool, …}``.
    """
    if uses_new_api():
        state: dict[str, object] = {n: _holder(n).fp32_precision for n in _NEW
                                    if hasattr(_holder(n), "fp32_precision")}
    else:
        state = {"cudnn.allow_tf32": _B.cudnn.allow_tf32,
                 "cuda.matmul.allow_tf32": _B.cuda.matmul.allow_tf32}
    state["deterministic"] = _B.cudnn.deterministic
    state["benchmark"] = _B.cudnn.benchmark
    return state


def _set(state: dict[str, object]) -> None:
    for name, value in state.items():
        if name == "deterministic":
            _B.cudnn.deterministic = value
        elif name == "benchmark":
            _B.cudnn.benchmark = value
        elif name == "cudnn.allow_tf32":
            _B.cudnn.allow_tf32 = value
        elif name == "cuda.matmul.allow_tf32":
            _B.cuda.matmul.allow_tf32 = value
        else:
            _holder(name).fp32_precision = value


def _wanted(mode: str, before: dict[str, object]) -> dict[str, object]:
    want: dict[str, object] = {"deterministic": True, "benchmark": False}
    if "cudnn.allow_tf32" in before:  # legacy API
        want["cudnn.allow_tf32"] = want["cuda.matmul.allow_tf32"] = mode == "tf32"
        return want
    for name in before:
        if name in _CUDA_KNOBS:
            want[name] = mode
        elif name.startswith("mkldnn.") and mode == "ieee":
            want[name] = "ieee"
    return want


@contextlib.contextmanager
def float32_scope(mode: str = "ieee") -> Iterator[None]:
    """float32 convolutions and matmuls in ``mode`` inside, cuDNN deterministic; all restored after.

    Args:
        mode: ``"ieee"`` (IEEE float32, the paper's arithmetic) or ``"tf32"`` (TF32 on CUDA).

    Examples:
        >>> with float32_scope("ieee"):
        ...     float32_state()["deterministic"]
        True
    """
    if mode not in FP32_MODES:
        raise ValueError(f"mode must be one of {FP32_MODES}, got {mode!r}")
    before = float32_state()
    _set(_wanted(mode, before))
    try:
        yield
    finally:
        _set(before)


def float32_mode(precision: str) -> str:
    """The :func:`float32_scope` mode of a trainer precision: TF32 for "tf32", IEEE otherwise
    (bf16's fp32 ops — BatchNorm, the loss, Adam — are IEEE too)."""
    return "tf32" if precision == "tf32" else "ieee"


def forward_autocast(precision: str, device: torch.device):
    """The autocast region of one forward pass: bf16 autocast (BatchNorm and the loss stay fp32)
    for ``"bf16"``; nothing for fp32/tf32 (the trainer runs with autocast off).

    A fresh region per forward, with its weight-cast cache off: autocast casts each fp32 weight
    once and reuses the copy until the *outermost* region exits, so one region around the whole
    step loop would train on the step-0 bf16 weights forever (the loop backend would learn
    nothing; the grouped one would freeze its convolutions). The trainer's own autocast-off
    region is outermost here, so only a disabled cache keeps each forward on the current weights.
    The backward pass and Adam run outside, as PyTorch recommends. Cost, measured on the 2-core CPU
    (2 runs × 150 digits steps, loop backend, one thread, min of 3): 7.4 s with the cache off,
    6.5–6.9 s with a per-step region and the cache on, which is correct only where no caller's
    autocast region encloses the trainer.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()
