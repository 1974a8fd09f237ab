"""The registry of initialisations: name → ``fn(model, *, data=None, generator=None, **options)``.

Every entry mutates ``model`` in place (under ``torch.no_grad()``) and returns a dict of what it did
(a report; may be empty). ``data`` is a batch of training images on the model's device —
standardised images as the network sees them — or, where a method needs more, a ``dict`` with
``images`` (the standardised batch) and ``raw`` (the same batch as raw [0, 1] pixels). ``generator``
is ``None``, an ``int`` seed or a ``torch.Generator`` on the model's device. Methods that need data
raise a ``ValueError`` when ``data`` is missing.

The harness compares any of them paired against ``kaiming`` (same seeds, same protocol).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["INITIALIZERS", "register", "get", "kaiming", "prewarm"]

Initializer = Callable[..., dict[str, Any]]
INITIALIZERS: dict[str, Initializer] = {}


def register(name: str) -> Callable[[Initializer], Initializer]:
    """Decorator: add ``fn`` to :data:`INITIALIZERS` under ``name`` (warns on overwrite)."""

    def deco(fn: Initializer) -> Initializer:
        if name in INITIALIZERS:
            warnings.warn(f"initializer {name!r} is registered again; replacing it", stacklevel=2)
        INITIALIZERS[name] = fn
        return fn

    return deco


def get(name: str) -> Initializer:
    """The initialiser registered as ``name``; a ``KeyError`` lists the known names."""
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise KeyError(f"unknown initializer {name!r}; known: {sorted(INITIALIZERS)}") from None


def _images(data) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(standardised images, raw [0, 1] images) from ``data`` (a tensor or a dict)."""
    if data is None:
        return None, None
    if isinstance(data, dict):
        return data.get("images"), data.get("raw")
    return data, None


@register("kaiming")
def kaiming(model: nn.Module, *, data=None, generator=None, **options) -> dict[str, Any]:
    """The baseline: the model's weights as constructed (PyTorch's default Kaiming-uniform init).

    The harness builds both arms of a pair from the same seed, so "kaiming" changes nothing.
    """
    if options:
        raise TypeError(f"kaiming takes no options, got {sorted(options)}")
    return {}


@register("prewarm")
def prewarm(model: nn.Module, *, data=None, generator=None, **options) -> dict[str, Any]:
    """Pre-Warm (:func:`prewarm_gpu.prewarm_`) on ``data``; options are ``prewarm_``'s keywords."""
    from .prewarm import prewarm_

    images, raw = _images(data)
    if images is None:
        raise ValueError("prewarm needs data: a batch of training images")
    options.setdefault("raw_images", raw)
    report = prewarm_(model, images, generator=generator, **options)
    return report.as_dict()


# Related methods register themselves on import (prewarm_gpu/methods/).
from . import methods  # noqa: E402,F401
