"""Each arm's options checked against its model and its batch's shape, before any run trains.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), §4.2. A grid cell (or a ``reproduce`` arm) whose options can never work on the model —
``n_clusters`` above the conv's filters, a patch smaller than the kernel, more patches than memory
holds — used to be found only when its first run started, after the Kaiming runs had trained.
:func:`check_arms` runs, for every arm, the checks of :func:`prewarm_gpu.prewarm_` that need no
pixel values (:func:`check_prewarm_options`), on the model built on the meta device (no memory,
no random draw) and the shape of the batch the run will see (``batch_size`` images of the
dataset's size).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import DATASETS
from ..layers import find_conv
from ..models import build_model
from ..prewarm_checks import _check_target
from ..prewarm_plan import plan_prewarm
from .arms import seeded_cpu_rng
from .plan import RunSpec

__all__ = ["check_prewarm_options", "check_arms"]


def check_prewarm_options(model: nn.Module, batch_shape: Sequence[int], options: dict[str, Any],
                          device: str | torch.device = "cpu") -> None:
    """Raise what :func:`prewarm_gpu.prewarm_` would raise for ``options`` on ``model`` and a
    batch of ``batch_shape`` (B, C, H, W), for every check that needs no pixel value: the target
    conv, then :func:`prewarm_gpu.prewarm_plan.plan_prewarm` (the same code ``prewarm_`` runs) with
    the memory of ``device`` for a float32 patch matrix. ``n_patches="auto"`` depends on the
    pixels (eq. 5/6): its patch count is not checked here."""
    name, conv = find_conv(model, batch_shape[1], options.get("layer"))
    _check_target(conv, name)
    plan_prewarm(conv, name, tuple(batch_shape), n_clusters=options.get("n_clusters"),
                 n_patches=options.get("n_patches", "auto"), scale=options.get("scale", "auto"),
                 patch_size=options.get("patch_size"),
                 kmeans_options=options.get("kmeans_options"), device=device)


# The initialisers whose options can be checked without data, and how.
CHECKS = {"prewarm": check_prewarm_options}


def _arm_name(spec: RunSpec) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in spec.options)
    return f"{spec.init}({opts})" if opts else spec.init


def check_arms(specs: Sequence[RunSpec], device: str | torch.device) -> None:
    """Every distinct arm of ``specs`` (per dataset and architecture) through its initialiser's
    data-free checks (:data:`CHECKS`); a ``ValueError`` naming the arm (the grid's cell) and
    what is wrong, before any run trains. ``device``: whose free memory bounds the patch matrix
    (``"meta"``, or a CUDA device this process cannot see: not checked)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("meta")  # _check_memory knows no free memory there: skipped
    models: dict[tuple[str, str], nn.Module] = {}
    seen = set()
    for s in specs:
        check = CHECKS.get(s.init)
        if check is None or (s.dataset, s.arch, s.options) in seen:
            continue
        seen.add((s.dataset, s.arch, s.options))
        ds = DATASETS[s.dataset]
        if (s.dataset, s.arch) not in models:
            # on the meta device: no memory, no weights drawn (and the global RNG forked anyway)
            with seeded_cpu_rng(0), torch.device("meta"):
                models[s.dataset, s.arch] = build_model(
                    s.arch, in_channels=ds.in_channels, n_classes=ds.n_classes,
                    image_size=ds.image_size)
        shape = (s.train.batch_size, ds.in_channels, *ds.image_size)
        try:
            check(models[s.dataset, s.arch], shape, dict(s.options), device)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{s.dataset} {_arm_name(s)} cannot run on {s.arch} (batches of "
                             f"{' × '.join(map(str, shape))}): {e}; nothing was trained") from None
