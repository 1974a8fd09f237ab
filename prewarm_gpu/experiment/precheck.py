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

from ..checks import as_pair, check_int, is_real
from ..data import DATASETS
from ..layers import find_conv
from ..models import build_model
from ..prewarm import _check_memory, _check_target, _kmeans
from .arms import seeded_cpu_rng
from .plan import RunSpec

__all__ = ["check_prewarm_options", "check_arms"]


def check_prewarm_options(model: nn.Module, batch_shape: Sequence[int], options: dict[str, Any],
                          device: str | torch.device = "cpu") -> None:
    """Raise what :func:`prewarm_gpu.prewarm_` would raise for ``options`` on ``model`` and a
    batch of ``batch_shape`` (B, C, H, W), for every check that needs no pixel values: the target
    conv, ``patch_size`` against the kernel and the images, ``n_clusters`` against the filters,
    ``n_patches`` against ``n_clusters`` and the memory of ``device``, ``scale``,
    ``kmeans_options``. ``n_patches="auto"`` depends on the pixels (eq. 5/6): not checked here.

    The same order and messages as ``prewarm_``'s own checks, whose helpers it calls where they
    are separate functions (``_check_target``, ``_kmeans``, ``_check_memory``).
    """
    B, C, H, W = batch_shape
    name, conv = find_conv(model, C, options.get("layer"))
    _check_target(conv, name)
    F = conv.out_channels
    kernel = tuple(conv.kernel_size)
    ps = options.get("patch_size")
    patch = kernel if ps is None else as_pair(ps, "patch_size")
    if patch[0] < kernel[0] or patch[1] < kernel[1]:
        raise ValueError(f"patch_size {patch} is smaller than the kernel {kernel}")
    dil = tuple(conv.dilation)
    span = ((patch[0] - 1) * dil[0] + 1, (patch[1] - 1) * dil[1] + 1)
    if H < span[0] or W < span[1]:
        raise ValueError(f"images of {H}×{W} are smaller than the {span[0]}×{span[1]} patch")
    if C * patch[0] * patch[1] == 1:
        raise ValueError("a 1×1 patch of one channel is 0 after mean-centring, so Pre-Warm's "
                         "centroids would all be 0; it needs C·K_h·K_w > 1")
    nc = options.get("n_clusters")
    k = F // 2 if nc is None else check_int("n_clusters", nc, 1, F)
    if k < 1:
        raise ValueError(f"n_clusters = ⌊F/2⌋ = 0 for a conv with out_channels={F}")
    _kmeans(k, options.get("kmeans_options"), torch.Generator())
    n_patches = options.get("n_patches", "auto")
    if n_patches != "auto":
        if isinstance(n_patches, str):
            raise ValueError(f"n_patches must be an int or 'auto', got {n_patches!r}")
        P = check_int("n_patches", n_patches, 1)
        if B * P < k:
            raise ValueError(f"{B} images × {P} patches = {B * P} patches, fewer than "
                             f"n_clusters={k}")
        _check_memory(B * P, C * patch[0] * patch[1], torch.device(device))
    positions = (H - span[0] + 1) * (W - span[1] + 1)
    if B * positions < k:
        raise ValueError(f"{B} images of {H}×{W} hold {B * positions} distinct {span[0]}×"
                         f"{span[1]} windows, fewer than n_clusters={k}: some filters would be "
                         "copies of others")
    scale = options.get("scale", "auto")
    if scale != "auto" and not (is_real(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 or 'auto', got {scale!r}")


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
