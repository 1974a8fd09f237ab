"""The statistic of Pre-Warm's n_patches rule over a dataset's whole training split (§3.4).

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), eq. 4-6 and Table 1: the rule reads the raw training images once per dataset. Below
the plan (:mod:`.plan` turns a rule into n_patches) and the reports (Table 1's row).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .. import rules
from ..data import DatasetInvalidError, ImageData


def _scaled_chunks(x: torch.Tensor, max_value: float, size: int) -> list[torch.Tensor]:
    """x in float32 chunks of `size` images, scaled to [0, 1] by `max_value`."""
    return [x[i : i + size].to(torch.float32) / max_value for i in range(0, x.shape[0], size)]


def rule_statistics(data: ImageData, *, otsu: bool = True,
                    patch_norm: bool = True) -> dict[str, float | None]:
    """The statistics of Pre-Warm's rules over the whole raw training split, in chunks: Otsu τ*
    and the foreground density d (eq. 4-5), and the mean 3×3 patch norm (eq. 6); a statistic not
    asked for is None. Fashion-MNIST: τ* 0.3809, d 0.3602 (≈ 1 s on one CPU thread)."""
    # ≈ 50 MB of unfolded 3×3 patches per chunk (9 values per pixel and channel).
    size = max(1, 1_500_000 // data.train_x[0].numel())
    chunks = _scaled_chunks(data.train_x, data.max_value, size)
    tau = d = norm = None
    if otsu:
        tau = rules.otsu_threshold(chunks, nbins=256)
        d = rules.foreground_density(chunks, threshold=tau)
    if patch_norm:
        norm = rules.mean_patch_norm(chunks, 3)
    return {"otsu_tau": tau, "d": d, "mean_patch_norm": norm}


@contextmanager
def refused_as_bad_data(data: ImageData) -> Iterator[None]:
    """The rules' refusal of ``data``'s training images (all zero, constant) as bad data: a
    :class:`~prewarm_gpu.data.DatasetInvalidError` naming their file (``stats`` and the dataset
    rule of ``reproduce``/``grid`` alike)."""
    try:
        yield
    except ValueError as e:
        where = data.files[0] if data.files else "the bundled images"
        raise DatasetInvalidError(f"{data.spec.name} training images ({where}): Table 1's "
                                  f"statistics are undefined for them: {e}") from e


def dataset_rule(data: ImageData) -> dict[str, Any]:
    """The rule of §3.4 on ``data``'s whole training split: ``{"source": "dataset", "rule":
    "otsu" | "patch_norm", "statistic": d or mean ‖p̃‖₂, "otsu_threshold": τ* or None}`` (eq. 5
    for one channel, eq. 6 for more, as :func:`prewarm_gpu.prewarm_`'s ``n_patches="auto"``);
    :func:`.plan.rule_n_patches` turns it into n_patches for a layer's F. Computed once per
    loaded dataset (kept on the data object)."""
    cached = data.__dict__.get("_dataset_rule")
    if cached is None:
        gray = data.spec.in_channels == 1
        with refused_as_bad_data(data):
            st = rule_statistics(data, otsu=gray, patch_norm=not gray)
        cached = {"source": "dataset", "rule": "otsu" if gray else "patch_norm",
                  "statistic": st["d"] if gray else st["mean_patch_norm"],
                  "otsu_threshold": st["otsu_tau"]}
        data.__dict__["_dataset_rule"] = cached
    return dict(cached)
