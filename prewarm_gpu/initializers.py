"""The two initialisations of the paper's comparison, ``kaiming`` (the baseline) and ``prewarm``;
the related methods live in :mod:`prewarm_gpu.methods`. All of them register into
:data:`prewarm_gpu.registry.INITIALIZERS`; the registry's initialiser lookups (``get``,
``check_options``, …) are re-exported here.

The harness compares any of them paired against ``kaiming`` (same seeds, same protocol).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .prewarm import prewarm_
from .registry import (
    INITIALIZERS,
    accepted_options,
    check_options,
    get,
    register,
    split_data,
)

__all__ = ["INITIALIZERS", "register", "get", "accepted_options", "check_options", "kaiming",
           "prewarm"]


@register("kaiming", options_of=())
def kaiming(model: nn.Module, *, data=None, generator=None, **options) -> dict[str, Any]:
    """The baseline: the model's weights as constructed (PyTorch's default Kaiming-uniform init).

    The harness builds both arms of a pair from the same seed, so "kaiming" changes nothing.
    """
    if options:
        raise TypeError(f"kaiming takes no options, got {sorted(options)}")
    return {}


@register("prewarm", options_of=prewarm_)
def prewarm(model: nn.Module, *, data=None, generator=None, **options) -> dict[str, Any]:
    """Pre-Warm (:func:`prewarm_gpu.prewarm_`) on ``data``; options are ``prewarm_``'s keywords."""
    images, raw = split_data(data)
    if images is None:
        raise ValueError("prewarm needs data: a batch of training images")
    options.setdefault("raw_images", raw)
    report = prewarm_(model, images, generator=generator, **options)
    return report.as_dict()
