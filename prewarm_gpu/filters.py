"""Pre-Warm's filter maths: steps 4-5 (inverse-Manhattan weighting, normalisation to σ) and §4.3's
centre crop of larger patches to the kernel.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), §4.2 steps 4-5 and §4.3. Pure functions of tensors, on the centroids' device and dtype.
"""

from __future__ import annotations

import torch

from .checks import as_pair

__all__ = ["distance_weights", "weight_and_normalise", "centre_crop"]


def distance_weights(patch_size: int | tuple[int, int], *, device=None, dtype=torch.float32):
    """Inverse-Manhattan weights ``w[i, j] = 1 / (1 + |i - K_h//2| + |j - K_w//2|)`` (§4.2, step 4).

    For K = 3: 1 at the centre, 1/2 on the edges, 1/3 at the corners. Shape (K_h, K_w).
    """
    kh, kw = as_pair(patch_size)
    i = torch.arange(kh, device=device, dtype=dtype) - kh // 2
    j = torch.arange(kw, device=device, dtype=dtype) - kw // 2
    return 1.0 / (1.0 + i.abs()[:, None] + j.abs()[None, :])


def weight_and_normalise(centroids: torch.Tensor, patch_size: int | tuple[int, int],
                         in_channels: int, scale: float) -> torch.Tensor:
    """Steps 4-5: ``c ← c · w`` (same w for every channel), then ``c ← c / (std(c) + 1e-8) · σ``.

    ``std`` is the population std (ddof 0) of the whole centroid matrix, as Listing 1's ``np.std``.
    """
    kh, kw = as_pair(patch_size)
    w = distance_weights((kh, kw), device=centroids.device, dtype=centroids.dtype)
    c = centroids.reshape(-1, in_channels, kh, kw) * w
    c = c.reshape(centroids.shape)
    return c / (c.std(unbiased=False) + 1e-8) * scale


def centre_crop(centroids: torch.Tensor, in_channels: int, patch_size: int | tuple[int, int],
                kernel_size: int | tuple[int, int]) -> torch.Tensor:
    """Crop flattened (C, P_h, P_w) centroids to the kernel, around the patch centre (§4.3).

    The window keeps the patch's centre pixel ``(P_h//2, P_w//2)`` at the kernel's centre
    ``(K_h//2, K_w//2)``, where step 4's weight is 1. Returns (k, C·K_h·K_w).
    """
    (ph, pw), (kh, kw) = as_pair(patch_size), as_pair(kernel_size)
    if (ph, pw) == (kh, kw):
        return centroids
    top, left = ph // 2 - kh // 2, pw // 2 - kw // 2
    c = centroids.reshape(-1, in_channels, ph, pw)[:, :, top : top + kh, left : left + kw]
    return c.reshape(c.shape[0], -1)
