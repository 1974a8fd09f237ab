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
import numbers
from collections.abc import Iterable

import torch

from ._random import as_generator

__all__ = [
    "otsu_threshold",
    "foreground_density",
    "mean_patch_norm",
    "n_patches_grayscale",
    "n_patches_color",
    "kaiming_parity_scale",
    "default_scale",
    "to_float",
    "all_finite",
]

GRAYSCALE_SCALE = 0.20
COLOR_SCALE = 0.25
COLOR_C = 6.65


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1] (÷255); float16/bfloat16 → float32; float32/float64 kept."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"images must be floating point or uint8, got {x.dtype}")
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def _is_int(v) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def all_finite(x: torch.Tensor) -> bool:
    """True when every element of a float tensor is finite, in one reduction pass.

    NaN and ±Inf propagate through a sum, so a finite sum proves every element finite; only
    when the sum is not finite (a NaN/Inf, or finite values whose sum overflows) does the exact
    elementwise check run.
    """
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


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
    if not isinstance(nbins, int) or nbins < 2:
        raise ValueError(f"nbins must be an int >= 2, got {nbins!r}")
    chunks = _chunks(x)
    if value_range is None:
        lo = min(float(c.min()) for c in chunks)
        hi = max(float(c.max()) for c in chunks)
    else:
        lo, hi = map(float, value_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or Inf; Otsu's threshold is undefined")
    return float(_otsu(chunks, nbins, lo, hi))


def _otsu(chunks: list[torch.Tensor], nbins: int, lo: float, hi: float) -> torch.Tensor:
    """:func:`otsu_threshold` on valid chunks and their finite range, as a 0-d float64 tensor on
    their device (no host sync)."""
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


def _density(chunks: list[torch.Tensor], threshold: float | torch.Tensor) -> torch.Tensor:
    """:func:`foreground_density` of valid chunks as a 0-d float64 tensor (no host sync)."""
    above = sum((c > threshold).sum() for c in chunks)
    return above.to(torch.float64) / sum(c.numel() for c in chunks)


def foreground_density(
    x: torch.Tensor | Iterable[torch.Tensor], threshold: float | None = None
) -> float:
    """Foreground density ``d = (1/N) Σ 1[x_i > τ*]`` (§4.3); τ* from :func:`otsu_threshold`."""
    chunks = _chunks(x)
    if threshold is None:
        threshold = otsu_threshold(chunks)
    return float(_density(chunks, threshold))


_GATHER_BLOCK = 1 << 24  # int64 index elements per gather block (128 MiB)


def random_patches(images: torch.Tensor, kh: int, kw: int, n_patches: int, g: torch.Generator,
                   dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``n_patches`` windows per image at uniform random top-left corners (every valid one, as
    Listing 1's ``random.randint``), drawn from ``g`` on the images' device; image-major order."""
    B, _, H, W = images.shape
    span_h, span_w = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    rows = torch.randint(0, H - span_h + 1, (B, n_patches), generator=g, device=images.device)
    cols = torch.randint(0, W - span_w + 1, (B, n_patches), generator=g, device=images.device)
    return gather_patches(images, rows, cols, kh, kw, dilation)


def gather_patches(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, kh: int, kw: int,
                   dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Patches at (b, rows[b, p], cols[b, p]) as (B·P, C·kh·kw), flattened (C, kh, kw).

    ``take`` on flat indices (top-left offset + window offsets); no Python loop over images or
    patches. The int64 index matrix is built in blocks of at most ``_GATHER_BLOCK`` elements
    (128 MiB), so the extra memory is bounded whatever the patch count (a typical batch is one
    block).
    """
    B, C, H, W = images.shape
    dev = images.device
    di = torch.arange(kh, device=dev) * dilation[0]
    dj = torch.arange(kw, device=dev) * dilation[1]
    ch = torch.arange(C, device=dev) * (H * W)
    window = (ch[:, None, None] + di[None, :, None] * W + dj[None, None, :]).reshape(-1)
    corner = (torch.arange(B, device=dev)[:, None] * (C * H * W) + rows * W + cols).reshape(-1, 1)
    flat = images.contiguous().reshape(-1)
    n, d = corner.shape[0], window.numel()
    step = max(1, _GATHER_BLOCK // d)
    if n <= step:
        return flat.take(corner + window)
    out = images.new_empty(n, d)
    for s in range(0, n, step):
        torch.take(flat, corner[s : s + step] + window, out=out[s : s + step])
    return out


def _box_sum(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Sum over every kh×kw window of (B, 1, H, W): (B, 1, H - kh + 1, W - kw + 1), by
    separable shifted adds (kh + kw - 2 adds, no cancellation)."""
    h, w = x.shape[-2] - kh + 1, x.shape[-1] - kw + 1
    rows = x[..., :h, :]
    for i in range(1, kh):
        rows = rows + x[..., i : i + h, :]
    out = rows[..., :w]
    for j in range(1, kw):
        out = out + rows[..., j : j + w]
    return out


def _window_norms(images: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``‖p - p̄‖₂`` of the patch at every position, without materialising the patches.

    With n = C·kh·kw values per patch, ``‖p - p̄‖² = Σp² - (Σp)²/n``; both sums are window sums
    of the channel sums of x and x², in float64 so that the difference keeps its precision.
    Returns (B, 1, H - kh + 1, W - kw + 1).
    """
    x = images.to(torch.float64)
    n = x.shape[1] * kh * kw
    s1 = _box_sum(x.sum(1, keepdim=True), kh, kw)
    s2 = _box_sum(x.square().sum(1, keepdim=True), kh, kw)
    return (s2 - s1.square() / n).clamp_(min=0).sqrt_()


def _pair(k, name: str = "kernel/patch size") -> tuple[int, int]:
    """An int or a pair of ints (each >= 1) as ``(K_h, K_w)``; numpy integers are accepted."""
    vals = None
    if _is_int(k):
        vals = [k, k]
    elif not isinstance(k, (str, bytes, torch.Tensor)):
        try:
            vals = list(k)  # tuple, list, range, torch.Size, 1-D numpy array
        except TypeError:
            pass
    if vals is None or len(vals) != 2 or not all(_is_int(v) for v in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {k!r}")
    pair = (int(vals[0]), int(vals[1]))
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {k!r}")
    return pair


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
    kh, kw = _pair(patch_size, "patch_size")
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
            norms = _window_norms(c, kh, kw)
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
    if not (isinstance(d, (int, float)) and 0 < d <= 1):
        raise ValueError(f"foreground density d must be in (0, 1], got {d}")
    return int(math.floor((n_filters / 4) / d))


def n_patches_color(norm: float, n_filters: int = 32, c: float = COLOR_C) -> int:
    """Eq. 6: ``n_patches = ⌊(F/4) · c · mean‖p̃‖₂⌋``, c ≈ 6.65. CIFAR-10 (0.522) → 27; SVHN → 16."""
    if not (isinstance(norm, (int, float)) and norm > 0 and math.isfinite(norm)):
        raise ValueError(f"mean patch norm must be finite and > 0, got {norm}")
    return int(math.floor((n_filters / 4) * c * norm))


def kaiming_parity_scale(in_channels: int, kernel_size: int | tuple[int, int]) -> float:
    """The Kaiming std ``sqrt(2 / fan_in)``, fan_in = C·K_h·K_w: the upper bound on σ (§4.4).

    ≈ 0.272 for C = 3, K = 3.
    """
    kh, kw = _pair(kernel_size)
    if in_channels < 1 or kh < 1 or kw < 1:
        raise ValueError(f"in_channels and kernel size must be >= 1, got {in_channels}, {(kh, kw)}")
    return math.sqrt(2.0 / (in_channels * kh * kw))


def default_scale(in_channels: int, kernel_size: int | tuple[int, int]) -> float:
    """σ of Table 2 (0.20 grayscale, 0.25 colour), never above the Kaiming parity bound."""
    base = GRAYSCALE_SCALE if in_channels == 1 else COLOR_SCALE
    return min(base, kaiming_parity_scale(in_channels, kernel_size))
