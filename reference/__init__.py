"""The paper's Pre-Warm, as written: numpy + scikit-learn, the gold standard for cross-checks.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(arXiv 2606.25256, 2026), Listing 1 (§5.2), equations 4-6 (§4.3-4.4) and Table 2.

Written for clarity, not speed. Not shipped in the wheel: tests and benchmarks import it from the
repository root (pytest's ``pythonpath = ["."]``).

Global random state
-------------------
``conditioned_init`` does what Listing 1 does: it calls ``torch.manual_seed(seed)``,
``random.seed(seed)`` and ``np.random.seed(seed)`` before extracting patches, so it *resets the
global RNGs of torch, Python and numpy as a side effect*, and patch positions come from Python's
global ``random`` module. ``prewarm_gpu`` never does this; it takes one ``generator`` instead.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

__all__ = [
    "conditioned_init",
    "extract_patches",
    "distance_weights",
    "weight_and_normalise",
    "minibatch_kmeans_fixed",
    "otsu_threshold",
    "foreground_density",
    "n_patches_grayscale",
    "mean_patch_norm",
    "n_patches_color",
    "kaiming_parity_scale",
]


# --------------------------------------------------------------------------- Listing 1
def extract_patches(images, patch_size: int, n_patches: int, positions=None) -> np.ndarray:
    """Listing 1's ``extract_patches``: ``n_patches`` random K×K patches per image, as (C, K, K).

    Args:
        images: a (B, C, H, W) torch tensor or numpy array.
        patch_size: K.
        n_patches: patches per image (ignored when ``positions`` is given).
        positions: optional (N, 3) integer array of explicit (image, row, col) triples, so tests can
            compare extraction exactly. Without it, positions come from Python's global ``random``
            exactly as in the paper (image-major order, ``random.randint(0, H - K)`` then
            ``random.randint(0, W - K)``).

    Returns:
        float array of shape (N, C·K·K); not yet mean-centred.
    """
    imgs_np = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    B, C, H, W = imgs_np.shape
    patches = []
    if positions is not None:
        for b, i, j in np.asarray(positions, dtype=np.int64):
            patches.append(imgs_np[b, :, i : i + patch_size, j : j + patch_size].flatten())
        return np.array(patches)
    for b in range(B):
        for _ in range(n_patches):
            i = random.randint(0, H - patch_size)
            j = random.randint(0, W - patch_size)
            patch = imgs_np[b, :, i : i + patch_size, j : j + patch_size]
            patches.append(patch.flatten())
    return np.array(patches)


def distance_weights(patch_size: int) -> np.ndarray:
    """Listing 1's inverse-Manhattan weights: ``w[i, j] = 1 / (1 + |i - c| + |j - c|)``, c = K // 2.

    Flattened row-major, length K². For K = 3: 1 at the centre, 1/2 on edges, 1/3 at corners.
    """
    c = patch_size // 2
    weights = [
        1.0 / (1 + abs(i - c) + abs(j - c)) for i in range(patch_size) for j in range(patch_size)
    ]
    return np.array(weights)


def weight_and_normalise(centroids: np.ndarray, patch_size: int, in_channels: int, scale: float):
    """Step 4-5 of §4.2 as Listing 1 does them: spatial weighting, then one global std to ``scale``.

    ``c ← c · tile(w, C)``;  ``c ← c / (std(c) + 1e-8) · σ`` (numpy std: population, ddof = 0).
    """
    dw_full = np.tile(distance_weights(patch_size), in_channels)
    centroids = centroids * dw_full[np.newaxis, :]
    return centroids / (np.std(centroids) + 1e-8) * scale


def conditioned_init(
    model, batch_images, n_clusters=16, n_patches=25, scale=0.20, patch_size=3, seed=42
):
    """Listing 1, verbatim in behaviour: Pre-Warm ``model.conv1`` from one batch of images.

    Resets the global RNGs of torch, Python and numpy to ``seed`` (as the paper does); k-means is
    ``sklearn.cluster.MiniBatchKMeans(n_clusters, random_state=seed, n_init=3)``.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    patches = extract_patches(batch_images, patch_size, n_patches)
    patches -= patches.mean(axis=1, keepdims=True)
    kmeans = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3)
    kmeans.fit(patches)
    centroids = kmeans.cluster_centers_.copy()
    C_in = batch_images.shape[1]
    centroids = weight_and_normalise(centroids, patch_size, C_in, scale)
    weight_tensor = torch.tensor(
        centroids.reshape(n_clusters, C_in, patch_size, patch_size), dtype=torch.float32
    )
    with torch.no_grad():
        target = model.conv1.weight
        num_to_copy = min(n_clusters, target.shape[0])
        target[:num_to_copy].copy_(weight_tensor[:num_to_copy])
    return model


def minibatch_kmeans_fixed(X, init_centers, batch_indices, reassignment_ratio=0.0):
    """scikit-learn's mini-batch step, run from given centres over given batches (no early stop).

    Uses ``MiniBatchKMeans.partial_fit`` with ``init=init_centers``: each call is exactly one
    ``_mini_batch_step`` (labels and inertia before the centres move; count-weighted update). With
    ``reassignment_ratio=0`` no random numbers are used, so the run is deterministic.

    Returns:
        (centres, counts, batch inertias) as numpy arrays.
    """
    X = np.asarray(X)
    init_centers = np.asarray(init_centers, dtype=X.dtype)
    km = MiniBatchKMeans(
        n_clusters=init_centers.shape[0],
        init=init_centers,
        n_init=1,
        batch_size=len(batch_indices[0]),
        reassignment_ratio=reassignment_ratio,
        random_state=0,
    )
    inertias = []
    for idx in batch_indices:
        xb = X[np.asarray(idx)]
        before = km.cluster_centers_.copy() if hasattr(km, "cluster_centers_") else init_centers
        d2 = ((xb[:, None, :] - before[None, :, :]) ** 2).sum(-1)
        inertias.append(d2.min(axis=1).sum())
        km.partial_fit(xb)
    return km.cluster_centers_.copy(), km._counts.copy(), np.array(inertias)


# --------------------------------------------------------------------------- rules (§4.3-4.4)
def otsu_threshold(raw_images, nbins: int = 256) -> float:
    """Otsu's threshold (eq. 4): ``τ* = argmax_τ ω0(τ) ω1(τ) [μ0(τ) - μ1(τ)]²``.

    Histogram of ``nbins`` equal bins over the data's [min, max]; the threshold is the centre of the
    bin that maximises the between-class variance (scikit-image's convention). On raw [0, 1] MNIST
    this gives τ* = 113.5/256 = 0.4434, the paper's value.
    """
    x = np.asarray(raw_images, dtype=np.float64).ravel()
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        raise ValueError(f"Otsu's threshold is undefined for constant images (all values {lo}).")
    hist, edges = np.histogram(x, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    w0 = np.cumsum(hist)
    w1 = np.cumsum(hist[::-1])[::-1]
    m0 = np.cumsum(hist * centres) / w0
    m1 = (np.cumsum((hist * centres)[::-1]) / w1[::-1])[::-1]
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def foreground_density(raw_images, threshold: float | None = None) -> float:
    """``d = (1/N) Σ 1[x_i > τ*]``: the fraction of raw pixels above the Otsu threshold."""
    x = np.asarray(raw_images, dtype=np.float64)
    if threshold is None:
        threshold = otsu_threshold(x)
    return float((x > threshold).mean())


def n_patches_grayscale(d: float, n_filters: int = 32) -> int:
    """Eq. 5: ``n_patches = ⌊(F/4) · (1/d)⌋``. MNIST d = 0.1373 → 58; Fashion d = 0.3602 → 22."""
    if not 0 < d <= 1:
        raise ValueError(f"foreground density d must be in (0, 1], got {d}")
    return int(math.floor((n_filters / 4) / d))


def mean_patch_norm(raw_images, patch_size: int = 3, n_patches: int | None = None, positions=None,
                    seed: int = 0) -> float:
    """Mean L2 norm of mean-centred K×K×C patches of raw [0, 1] images (the statistic of eq. 6).

    Every patch position when ``n_patches`` is None; else ``n_patches`` random positions per image
    (numpy ``default_rng(seed)``) or the explicit (image, row, col) ``positions``.
    """
    x = raw_images.cpu().numpy() if isinstance(raw_images, torch.Tensor) else np.asarray(raw_images)
    x = x.astype(np.float64)
    B, C, H, W = x.shape
    if positions is None:
        if n_patches is None:
            positions = [(b, i, j) for b in range(B) for i in range(H - patch_size + 1)
                         for j in range(W - patch_size + 1)]
        else:
            rng = np.random.default_rng(seed)
            positions = [(b, int(rng.integers(0, H - patch_size + 1)),
                          int(rng.integers(0, W - patch_size + 1)))
                         for b in range(B) for _ in range(n_patches)]
    norms = []
    for b, i, j in positions:
        p = x[b, :, i : i + patch_size, j : j + patch_size].ravel()
        norms.append(np.linalg.norm(p - p.mean()))
    return float(np.mean(norms))


def n_patches_color(norm: float, n_filters: int = 32, c: float = 6.65) -> int:
    """Eq. 6: ``n_patches = ⌊(F/4) · c · mean‖p̃‖₂⌋``, c ≈ 6.65. Norm 0.522 → 27; 0.308 → 16."""
    if not norm > 0:
        raise ValueError(f"mean patch norm must be > 0, got {norm}")
    return int(math.floor((n_filters / 4) * c * norm))


def kaiming_parity_scale(in_channels: int, kernel_size) -> float:
    """Kaiming std ``sqrt(2 / fan_in)``, fan_in = C·K_h·K_w: the paper's upper bound on σ (§4.4).

    ≈ 0.272 at C = 3, K = 3.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return math.sqrt(2.0 / (in_channels * kh * kw))
