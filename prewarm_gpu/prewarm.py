"""Pre-Warm: k-means centroids of mean-centred image patches as first-layer filters, on the device.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), §4.2 steps 1-5 and Table 2. Every step is a batched torch op on the images' device:

1. patches: ``n_patches`` random K_h×K_w windows per image, gathered by one indexing op;
2. mean-centring: ``p̃ = p - p̄`` (each patch's own mean over all C·K_h·K_w values);
3. ``MiniBatchKMeans(n_clusters, n_init=3)`` (scikit-learn's algorithm, in torch);
4. inverse-Manhattan weighting: ``c[ch, i, j] *= 1 / (1 + |i - i_c| + |j - j_c|)``;
5. normalisation: ``c ← c / (std(c) + 1e-8) · σ`` (one global population std);

and the result is written into filters ``[0, n_clusters)`` of the target conv.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .filters import centre_crop, weight_and_normalise
from .kmeans import MiniBatchKMeans
from .kmeans_ops import no_autocast
from .patches import extract_patches
from .prewarm_plan import PrewarmPlan, ResolvedPrewarm, _kmeans, resolve_prewarm

__all__ = ["prewarm_", "conditioned_init", "PrewarmReport"]


@dataclass
class PrewarmReport:
    """What :func:`prewarm_` did."""

    layer: str  # dotted name of the conv that was initialised ("" for a bare Conv2d)
    n_clusters: int  # filters written: [0, n_clusters)
    n_patches: int  # patches per image
    patch_size: tuple[int, int]  # (K_h, K_w)
    scale: float  # σ, the std of the written filters
    rule: str  # how n_patches was chosen: "given", "otsu" (eq. 5) or "patch_norm" (eq. 6)
    statistic: float | None  # d (otsu) or the mean patch norm (patch_norm)
    otsu_threshold: float | None  # τ* (otsu rule)
    scale_rule: str  # "given", or "auto" (Table 2's σ capped at the Kaiming parity bound)
    inertia: float  # k-means inertia over all patches
    kmeans_steps: int  # mini-batch steps taken
    seconds: float  # wall time of the call, to its last host read (the write is queued)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


# --------------------------------------------------------------------------- public API
def prewarm_(
    model: nn.Module,
    images: torch.Tensor,
    *,
    layer: str | None = None,
    n_clusters: int | None = None,
    n_patches: int | str = "auto",
    scale: float | str = "auto",
    patch_size: int | tuple[int, int] | None = None,
    raw_images: torch.Tensor | None = None,
    kmeans_options: dict[str, Any] | None = None,
    generator: int | torch.Generator | None = None,
) -> PrewarmReport:
    """Pre-Warm the first conv of ``model`` in place from one batch of images.

    `Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` -
    Martinsn (2026). Filters ``[0, n_clusters)`` become spatially weighted k-means centroids of
    mean-centred patches, scaled to std σ; every other parameter is untouched.

    .. math::
        W_{[0,k)} = \\sigma\\,\\frac{\\tilde C \\odot w}{\\operatorname{std}(\\tilde C \\odot w)
        + 10^{-8}}, \\quad w_{ij} = \\frac{1}{1 + |i - i_c| + |j - j_c|}

    Rules (Table 2) with F the conv's out_channels: ``n_clusters = ⌊F/2⌋``; ``patch_size`` = the
    kernel; ``n_patches = ⌊(F/4)/d⌋`` (one channel, d = Otsu foreground density) or
    ``⌊(F/4)·6.65·mean‖p̃‖₂⌋`` (several channels); σ = 0.20 (one channel) / 0.25, capped at the
    Kaiming parity bound ``sqrt(2/fan_in)``.

    Args:
        model: any module (or a bare ``nn.Conv2d``).
        images: (B, C, H, W) batch as the network sees it (float or uint8 ÷ 255), on the model's
            device.
        layer: dotted name of the target conv; default: the first ``nn.Conv2d`` whose
            ``in_channels`` equals C.
        n_clusters: filters to condition (default ⌊F/2⌋).
        n_patches: patches per image, or ``"auto"`` (eq. 5 / eq. 6 on ``raw_images``).
        scale: σ, or ``"auto"``.
        patch_size: default the kernel's; larger patches' centroids are centre-cropped to the
            kernel (§4.3) before steps 4-5 (the filters keep std σ); smaller is an error.
        raw_images: raw [0, 1] pixels for the rules (default ``images``): the same batch, or more
            images of the same (C, H, W), e.g. the whole training split; used only when
            ``n_patches="auto"``, with a warning when the values leave [0, 1].
        kmeans_options: keywords for :class:`~prewarm_gpu.MiniBatchKMeans` but ``n_clusters``,
            ``init``, ``random_state`` (default: Listing 1's ``n_init=3``, else scikit-learn's).
        generator: ``None``, an ``int`` seed or a ``torch.Generator`` on the images' device.

    Returns:
        A :class:`PrewarmReport`.

    Example:
        >>> model = torchvision.models.resnet18()
        >>> report = prewarm_(model, images, generator=0)  # conv1: 7×7, stride 2
    """
    _warn_if_ddp(model)
    # no grad (nothing is differentiated); no caller's autocast lowering the float64/32 arithmetic
    with torch.no_grad(), no_autocast():
        return _apply(resolve_prewarm(
            model, images, layer=layer, n_clusters=n_clusters, n_patches=n_patches, scale=scale,
            patch_size=patch_size, raw_images=raw_images, kmeans_options=kmeans_options,
            generator=generator))


def _warn_if_ddp(model: nn.Module) -> None:
    """A ``DistributedDataParallel`` model (compiled or not) was wrapped already: DDP broadcast
    the parameters when it was built, so this rank's write would stay on this rank."""
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(model, ddp) or isinstance(getattr(model, "_orig_mod", None), ddp):
        warnings.warn("prewarm_ on a DistributedDataParallel model writes this rank's filters "
                      "only (DDP broadcasts parameters when it is built): the ranks would train "
                      "different filters. Call prewarm_ before wrapping, or "
                      "prewarm_distributed_ (rank 0's filters on every rank)", stacklevel=3)


def conditioned_init(model: nn.Module, batch_images: torch.Tensor, n_clusters: int = 16,
                     n_patches: int = 25, scale: float = 0.20, patch_size: int = 3,
                     seed: int = 42) -> nn.Module:
    """The paper's Listing 1 signature, backed by :func:`prewarm_`; returns ``model``.

    Targets ``model.conv1`` as Listing 1 does (or the first matching conv if there is none), with
    the paper's explicit defaults. As in Listing 1, ``n_clusters`` may exceed the conv's filters:
    all are clustered and normalised together, and the first ``out_channels`` are written. Unlike
    Listing 1 it does not reseed the global RNGs.
    """
    layer = "conv1" if isinstance(getattr(model, "conv1", None), nn.Conv2d) else None
    with torch.no_grad(), no_autocast():
        _apply(resolve_prewarm(model, batch_images, layer=layer, n_clusters=n_clusters,
                               n_patches=n_patches, scale=scale, patch_size=patch_size,
                               generator=seed, listing1=True))
    return model


# --------------------------------------------------------------------------- steps 1-5, the write
def _apply(call: ResolvedPrewarm) -> PrewarmReport:
    """Steps 1-5 and the write, for a call :func:`~prewarm_gpu.prewarm_plan.resolve_prewarm` has
    checked and decided: cluster, crop, weight and normalise, check, write filters
    ``[0, plan.n_written)``; the report. Runs under the caller's ``no_grad`` and ``no_autocast``."""
    plan, x = call.plan, call.x
    conv, k, kernel, sigma = plan.conv, plan.n_clusters, plan.kernel, plan.scale
    C = x.shape[1]
    km = _kmeans(k, plan.kmeans_options, call.generator)
    centroids = _cluster(km, x, plan.patch, plan.dilation, plan.n_patches)
    centroids = centre_crop(centroids, C, plan.patch, kernel)
    # Steps 4-5 in float64 (k filters: free) at unit σ, then σ, then one cast to the conv's
    # dtype. unit · σ is the same bits as normalising with σ directly (· 1.0 is exact); the
    # checks judge the spread at unit scale, so a σ that over- or underflows is named as
    # the scale's fault, not the images'.
    unit = weight_and_normalise(centroids.to(torch.float64), kernel, C, 1.0)
    unit_kept = unit.reshape(k, C, *kernel)[: plan.n_written]  # k ≤ F but in Listing 1's mode
    filters = (unit_kept * sigma).to(conv.weight.dtype)
    inertia = _check_filters(plan, x, centroids, unit, unit_kept, filters, km.inertia_tensor_)
    conv.weight[: filters.shape[0]].copy_(filters)  # under prewarm_'s no_grad; queued, not awaited
    return PrewarmReport(
        layer=plan.layer, n_clusters=filters.shape[0], n_patches=plan.n_patches,
        patch_size=plan.patch, scale=sigma, rule=call.rule, statistic=call.statistic,
        otsu_threshold=call.otsu_threshold, scale_rule=plan.scale_rule, inertia=inertia,
        kmeans_steps=km.n_steps_, seconds=time.perf_counter() - call.started,
    )


def _cluster(km: MiniBatchKMeans, x, patch, dil, n_patches):
    """Steps 1-3: extract, mean-centre, cluster with ``km``. Returns centroids (k, C·K_h·K_w)."""
    p = extract_patches(x, patch, n_patches, dilation=dil, generator=km.random_state)
    p -= p.mean(1, keepdim=True)  # in place: the patch matrix is the largest tensor of a call
    # p is valid (skip fit's checks) and ours: k-means may rescale it in place, no copy
    return km.fit_valid(p, overwrite_x=True).cluster_centers_


def _check_filters(plan: PrewarmPlan, x: torch.Tensor, centroids: torch.Tensor,
                   unit: torch.Tensor, unit_kept: torch.Tensor, filters: torch.Tensor,
                   km_inertia: torch.Tensor) -> float:
    """The checks before the write, in the call's one read of the device's results: k-means did
    not overflow, the centroids are not all 0, their spread survives the normalisation's 1e-8,
    σ fits the conv's dtype (a ``ValueError`` naming the cause); a warning when centroids repeat.
    Returns the k-means inertia (``km_inertia``, a 0-d tensor) as a float, for the report."""
    k, sigma, dtype = plan.n_clusters, plan.scale, plan.conv.weight.dtype
    c64 = centroids.to(torch.float64)
    copies = (torch.cdist(c64, c64) == 0).triu(1).any(0).sum()  # centroids equal to an earlier one
    x_max, c_max, norm, want, got, z_max, inertia, n_copies = torch.stack([
        x.abs().amax().to(torch.float64), centroids.abs().amax().to(torch.float64),
        unit.std(unbiased=False), unit_kept.std(unbiased=False),
        (filters.to(torch.float64) / sigma).std(unbiased=False), unit_kept.abs().amax(),
        km_inertia, copies.to(torch.float64)]).tolist()
    if not (math.isfinite(c_max) and math.isfinite(inertia)):
        raise ValueError(f"k-means overflowed: images of magnitude up to {x_max:.3g} have squared "
                         f"distances beyond {x.dtype}'s range; rescale the images")
    if c_max == 0:
        raise ValueError("every centroid is 0: the sampled patches are constant after "
                         "mean-centring; Pre-Warm needs images with local contrast")
    if not abs(norm - 1) <= 0.01:  # the paper's c / (std(c) + 1e-8) · σ, at σ = 1
        raise ValueError(f"the centroids' spread is too small for the normalisation's 1e-8 "
                         f"(images of magnitude up to {x_max:.3g}): the filters' std would be "
                         f"{norm * sigma:.3g}, not σ = {sigma:g}; rescale the images (e.g. to "
                         "[0, 1])")
    if not (want > 0 and abs(got - want) <= 0.01 * want):  # also catches NaN/Inf
        fi = torch.finfo(dtype)
        what = (f"their std would be {got * sigma:g} instead of {sigma:g}" if math.isfinite(got)
                else "they would not be finite")
        raise ValueError(
            f"scale={sigma:g} does not fit the conv's {dtype} weights: it is "
            f"outside their usable range, about [{fi.smallest_normal:.3g}, "
            f"{fi.max / z_max:.3g}] for these filters (beyond it they underflow or overflow); "
            f"written, {what}")
    if n_copies:
        warnings.warn(f"only {k - int(n_copies)} distinct centroids of n_clusters={k}: the batch "
                      "has too few distinct patches, so some conditioned filters are copies",
                      stacklevel=4)  # the caller of prewarm_ (through _apply)
    return inertia
