"""Pre-Warm's closed-form rules (§4.3-4.4, eq. 4-6, Table 2), on the input's device.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). Every statistic accepts one tensor or an iterable of tensors (chunks of a dataset too
large to hold at once); chunked and whole-tensor results agree.

============  ===============================  ====================================
parameter     grayscale (C = 1)                colour (C = 3; used for any C > 1)
============  ===============================  ====================================
n_patches     ⌊(F/4) / d⌋            (eq. 5)   ⌊(F/4) · c · mean‖p̃‖₂⌋, c = 6.65 (eq. 6)
scale σ       0.20                             0.25
bound on σ    sqrt(2 / (C·K_h·K_w))  (Kaiming parity, §4.4)
============  ===============================  ====================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ._random import as_generator
from .checks import as_pair, is_int, is_real, to_float
from .patches import random_patches, window_norms

__all__ = [
    "otsu_threshold",
    "foreground_density",
    "mean_patch_norm",
    "n_patches_grayscale",
    "n_patches_color",
    "kaiming_parity_scale",
    "default_scale",
    "otsu_threshold_on_device",
    "foreground_density_on_device",
]

GRAYSCALE_SCALE = 0.20
COLOR_SCALE = 0.25
COLOR_C = 6.65


def _chunks(x: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    chunks = [x] if isinstance(x, torch.Tensor) else list(x)
    if not chunks:
        raise ValueError("no data: got an empty iterable of chunks")
    for c in chunks:
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"expected torch.Tensor chunks, got {type(c).__name__}")
    return [to_float(c) for c in chunks]


def otsu_threshold(
    x: torch.Tensor | Iterable[torch.Tensor],
    nbins: int = 256,
    *,
    value_range: tuple[float, float] | None = None,
) -> float:
    """Otsu's threshold (eq. 4) by an on-device histogram.

    .. math::
        \\tau^* = \\arg\\max_\\tau \\; \\omega_0(\\tau)\\,\\omega_1(\\tau)\\,
        [\\mu_0(\\tau) - \\mu_1(\\tau)]^2

    ``nbins`` equal bins over the data's [min, max] (or ``value_range``); τ* is the centre of the
    maximising bin (scikit-image's convention; MNIST's raw pixels give 113.5/256 = 0.4434, the
    paper's value).

    Args:
        x: raw pixels (any shape), or an iterable of chunks of them.
        nbins: histogram bins.
        value_range: fixed (lo, hi) instead of the data's min and max.
    """
    if not is_int(nbins) or nbins < 2:
        raise ValueError(f"nbins must be an int >= 2, got {nbins!r}")
    chunks = _chunks(x)
    if value_range is None:
        lo = min(float(c.min()) for c in chunks)
        hi = max(float(c.max()) for c in chunks)
    else:
        lo, hi = map(float, value_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or Inf; Otsu's threshold is undefined")
    return float(otsu_threshold_on_device(chunks, int(nbins), lo, hi))


def otsu_threshold_on_device(chunks: list[torch.Tensor], nbins: int, lo: float,
                             hi: float) -> torch.Tensor:
    """:func:`otsu_threshold` of float chunks whose finite range ``(lo, hi)`` is known, as a 0-d
    float64 tensor on their device: no host sync (for callers that batch their reads)."""
    if lo >= hi:
        raise ValueError(
            f"Otsu's threshold is undefined for constant images (every value is {lo:g})"
        )
    dev = chunks[0].device
    hist = torch.zeros(nbins, dtype=torch.float64, device=dev)
    for c in chunks:
        # Bin i covers [lo + i·w, lo + (i+1)·w); the maximum goes in the last bin, as numpy does.
        # Counts by index_add of ones: exact in float64 in any order, and no sync (CUDA's bincount
        # reads the maximum label on the host).
        v = c.reshape(-1).to(torch.float64)
        idx = ((v - lo) * (nbins / (hi - lo))).floor().clamp_(0, nbins - 1).long()
        hist.index_add_(0, idx, torch.ones_like(v))
    centres = lo + (torch.arange(nbins, dtype=torch.float64, device=dev) + 0.5) * (hi - lo) / nbins
    w0 = hist.cumsum(0)
    w1 = hist.flip(0).cumsum(0).flip(0)
    m0 = (hist * centres).cumsum(0) / w0
    m1 = (hist * centres).flip(0).cumsum(0).flip(0) / w1
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]).square()
    between = torch.nan_to_num(between, nan=-1.0)  # empty leading/trailing classes
    return centres.take(between.argmax())


def foreground_density_on_device(chunks: list[torch.Tensor],
                                 threshold: float | torch.Tensor) -> torch.Tensor:
    """:func:`foreground_density` of float chunks as a 0-d float64 tensor on their device (no
    host sync)."""
    above = sum((c > threshold).sum() for c in chunks)
    return above.to(torch.float64) / sum(c.numel() for c in chunks)


def foreground_density(
    x: torch.Tensor | Iterable[torch.Tensor], threshold: float | None = None
) -> float:
    """Foreground density ``d = (1/N) Σ 1[x_i > τ*]`` (§4.3); τ* from :func:`otsu_threshold`."""
    chunks = _chunks(x)
    if threshold is None:
        threshold = otsu_threshold(chunks)
    return float(foreground_density_on_device(chunks, threshold))


def mean_patch_norm(
    x: torch.Tensor | Iterable[torch.Tensor],
    patch_size: int | tuple[int, int] = 3,
    *,
    n_patches: int | None = None,
    generator: int | torch.Generator | None = None,
) -> float:
    """Mean L2 norm of mean-centred K×K×C patches, ``mean ‖p - p̄‖₂`` (the statistic of eq. 6).

    Args:
        x: raw [0, 1] images (B, C, H, W), or an iterable of such chunks.
        patch_size: K, or (K_h, K_w).
        n_patches: ``None`` (default) uses every patch position (exact, deterministic; chunk large
            datasets); an int samples that many random positions per image.
        generator: randomness for ``n_patches``.
    """
    kh, kw = as_pair(patch_size, "patch_size")
    chunks = _chunks(x)
    g = None
    total, count = 0.0, 0
    for c in chunks:
        if c.ndim != 4:
            raise ValueError(f"images must be 4-D (B, C, H, W), got shape {tuple(c.shape)}")
        B, C, H, W = c.shape
        if H < kh or W < kw:
            raise ValueError(f"images of {H}×{W} are smaller than the {kh}×{kw} patch")
        if n_patches is None:
            norms = window_norms(c, kh, kw)
        else:
            if g is None:
                g = as_generator(generator, c.device)
            p = random_patches(c, kh, kw, n_patches, g)
            norms = torch.linalg.vector_norm(p - p.mean(1, keepdim=True), dim=1)
        total += float(norms.to(torch.float64).sum())
        count += norms.numel()
    return total / count


def n_patches_grayscale(d: float, n_filters: int = 32) -> int:
    """Eq. 5: ``n_patches = ⌊(F/4) · (1/d)⌋``. MNIST (d = 0.1373) → 58; Fashion (0.3602) → 22."""
    if not (is_real(d) and 0 < d <= 1):
        raise ValueError(f"foreground density d must be in (0, 1], got {d}")
    return int(math.floor((n_filters / 4) / d))


def n_patches_color(norm: float, n_filters: int = 32, c: float = COLOR_C) -> int:
    """Eq. 6: ``n_patches = ⌊(F/4) · c · mean‖p̃‖₂⌋``, c ≈ 6.65. CIFAR-10 (0.522) → 27; SVHN → 16."""
    if not (is_real(norm) and norm > 0):
        raise ValueError(f"mean patch norm must be finite and > 0, got {norm}")
    return int(math.floor((n_filters / 4) * c * norm))


def kaiming_parity_scale(in_channels: int, kernel_size: int | tuple[int, int]) -> float:
    """The Kaiming std ``sqrt(2 / fan_in)``, fan_in = C·K_h·K_w: the upper bound on σ (§4.4).

    ≈ 0.272 for C = 3, K = 3.
    """
    kh, kw = as_pair(kernel_size)
    if in_channels < 1 or kh < 1 or kw < 1:
        raise ValueError(f"in_channels and kernel size must be >= 1, got {in_channels}, {(kh, kw)}")
    return math.sqrt(2.0 / (in_channels * kh * kw))


def default_scale(in_channels: int, kernel_size: int | tuple[int, int]) -> float:
    """σ of Table 2 (0.20 grayscale, 0.25 colour), never above the Kaiming parity bound."""
    base = GRAYSCALE_SCALE if in_channels == 1 else COLOR_SCALE
    return min(base, kaiming_parity_scale(in_channels, kernel_size))
