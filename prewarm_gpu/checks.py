"""Argument checks and conversions shared by every module: one integer predicate, one real-number
predicate, one kernel/patch-size parser, one float conversion, one finiteness test.

Numpy scalars are accepted wherever Python numbers are (``np.int64(3)`` is an int here), and a
``bool`` is never a number.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["is_int", "is_real", "check_int", "as_pair", "to_float", "all_finite"]


def is_int(v) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A finite Python or numpy real number (integers included), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (``hi=None``: no upper bound).

    Raises:
        TypeError: ``value`` is not an int (:func:`is_int`); the message names ``name``.
        ValueError: it is out of range.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


def as_pair(k, name: str = "kernel/patch size") -> tuple[int, int]:
    """An int or a pair of ints (each >= 1) as ``(K_h, K_w)``.

    Raises:
        TypeError: ``k`` is neither an int nor a pair of ints (the message names ``name``).
        ValueError: a value is below 1.
    """
    vals = None
    if is_int(k):
        vals = [k, k]
    elif not isinstance(k, (str, bytes, torch.Tensor)):
        try:
            vals = list(k)  # tuple, list, range, torch.Size, 1-D numpy array
        except TypeError:
            pass
    if vals is None or len(vals) != 2 or not all(is_int(v) for v in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {k!r}")
    pair = (int(vals[0]), int(vals[1]))
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {k!r}")
    return pair


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1] (÷255); float16/bfloat16 → float32; float32/float64 kept."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"images must be floating point or uint8, got {x.dtype}")
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def all_finite(x: torch.Tensor) -> bool:
    """True when every element of a float tensor is finite, in one reduction pass.

    NaN and ±Inf propagate through a sum, so a finite sum proves every element finite; only
    when the sum is not finite (a NaN/Inf, or finite values whose sum overflows) does the exact
    elementwise check run.
    """
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())
