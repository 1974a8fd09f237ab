"""Image patches on the images' device: random windows gathered by one indexing op (Pre-Warm's
step 1, §4.2), and the norm of every mean-centred window without materialising it (eq. 6's
statistic).

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). No Python loop over images or patches; every temporary is bounded (:data:`GATHER_BLOCK`).
"""

from __future__ import annotations

import torch

from ._random import as_generator
from .checks import as_pair

__all__ = ["GATHER_BLOCK", "extract_patches", "random_patches", "gather_patches", "window_norms"]

GATHER_BLOCK = 1 << 24  # int64 index elements per gather block (128 MiB)


def extract_patches(images: torch.Tensor, patch_size: int | tuple[int, int], n_patches: int, *,
                    dilation: int | tuple[int, int] = 1,
                    generator: int | torch.Generator | None = None) -> torch.Tensor:
    """``n_patches`` random windows per image, flattened (C, K_h, K_w): (B·n_patches, C·K_h·K_w).

    Positions are uniform over every valid top-left corner (as Listing 1's ``random.randint``),
    drawn on the images' device; image-major order, as Listing 1. Not mean-centred.

    Examples:
        >>> extract_patches(torch.rand(2, 3, 8, 8), 3, 5, generator=0).shape
        torch.Size([10, 27])
    """
    kh, kw = as_pair(patch_size, "patch_size")
    g = as_generator(generator, images.device)
    return random_patches(images, kh, kw, n_patches, g, as_pair(dilation, "dilation"))


def random_patches(images: torch.Tensor, kh: int, kw: int, n_patches: int, g: torch.Generator,
                   dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """:func:`extract_patches` on valid arguments: ``n_patches`` windows per image at uniform
    random top-left corners drawn from ``g`` on the images' device; image-major order."""
    B, _, H, W = images.shape
    span_h, span_w = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    rows = torch.randint(0, H - span_h + 1, (B, n_patches), generator=g, device=images.device)
    cols = torch.randint(0, W - span_w + 1, (B, n_patches), generator=g, device=images.device)
    return gather_patches(images, rows, cols, kh, kw, dilation)


def gather_patches(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, kh: int, kw: int,
                   dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Patches at (b, rows[b, p], cols[b, p]) as (B·P, C·kh·kw), flattened (C, kh, kw).

    ``take`` on flat indices (top-left offset + window offsets); no Python loop over images or
    patches. The int64 index matrix is built in blocks of at most :data:`GATHER_BLOCK` elements
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
    step = max(1, GATHER_BLOCK // d)
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


def window_norms(images: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``‖p - p̄‖₂`` of the patch at every position, without materialising the patches.

    .. math::
        \\|p - \\bar p\\|_2^2 = \\sum p^2 - \\frac{(\\sum p)^2}{n}, \\qquad n = C K_h K_w

    Both sums are window sums of the channel sums of x and x², in float64 so that the difference
    keeps its precision. Returns (B, 1, H - kh + 1, W - kw + 1).
    """
    x = images.to(torch.float64)
    n = x.shape[1] * kh * kw
    s1 = _box_sum(x.sum(1, keepdim=True), kh, kw)
    s2 = _box_sum(x.square().sum(1, keepdim=True), kh, kw)
    return (s2 - s1.square() / n).clamp_(min=0).sqrt_()
