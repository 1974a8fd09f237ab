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
import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import rules
from ._random import as_generator
from .checks import all_finite, as_pair, check_int, is_real, to_float
from .kmeans import MiniBatchKMeans, no_autocast
from .layers import conv_label, find_conv, refuse_lazy
from .patches import extract_patches

__all__ = ["prewarm_", "conditioned_init", "PrewarmReport", "PrewarmPlan", "plan_prewarm",
           "distance_weights", "weight_and_normalise", "centre_crop"]


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


# --------------------------------------------------------------------------- pure steps
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


# --------------------------------------------------------------------------- validation
def _available_memory(device: torch.device) -> int | None:
    """Bytes the call may still allocate on ``device``: on CUDA the driver's free memory plus
    what PyTorch's caching allocator has reserved but not allocated (blocks it hands out again
    without asking the driver, which ``mem_get_info`` counts as used); Linux's ``MemAvailable``;
    None where the OS does not say."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _check_memory(n: int, d: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before any work, a patch matrix (n, d) of ``dtype`` (the images' float dtype) that
    does not fit in memory. The rest of a call is bounded apart from it: blocks of at most
    2**22-2**24 elements (tested), and k-means rescales the matrix in place (no copy)."""
    need = n * d * dtype.itemsize
    free = _available_memory(device)
    if free is not None and need > free:
        raise ValueError(f"{n} patches of {d} {dtype} values need {need / 2**30:.1f} GiB for the "
                         f"patch matrix alone, more than the {free / 2**30:.1f} GiB available on "
                         f"{device}; lower n_patches")



def _check_target(conv: nn.Conv2d, name: str) -> None:
    """The conv's weight must be a materialised, writable parameter of its own."""
    refuse_lazy(conv, name)
    label = conv_label(name)
    if not isinstance(conv._parameters.get("weight"), nn.Parameter):
        raise ValueError(
            f"{label} computes its weight from other parameters (torch.nn.utils.parametrize, "
            "weight_norm or spectral_norm), so a write to it would be lost; apply Pre-Warm "
            "before adding the parametrization"
        )
    cls = type(conv).__name__
    if re.search(r"Std|WS$|WeightStandardi", cls):
        raise ValueError(f"{label} is a weight-standardised conv ({cls}): its forward re-"
                         "standardises the weight, so the filters' std σ that Pre-Warm writes "
                         "would have no effect; use a plain nn.Conv2d")
    if type(conv).forward is not nn.Conv2d.forward:
        warnings.warn(f"{label} ({cls}) overrides Conv2d.forward: if that transforms the weight, "
                      "the written filters' std σ may not be what the layer uses", stacklevel=4)
    if conv.weight.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{label}'s weight was created under torch.inference_mode() and cannot "
                         "be written outside it; build the model outside inference mode")


def _check_images(images: torch.Tensor, conv: nn.Conv2d, name: str) -> torch.Tensor:
    """Checks of a 4-D image tensor against the target conv; returns it as float (≥ float32)."""
    if images.shape[0] < 1:
        raise ValueError("images is an empty batch")
    if images.is_meta:
        raise ValueError("images are on the meta device: they hold no values")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be floating point or uint8, got {images.dtype}")
    C = images.shape[1]
    label = conv_label(name)
    if C != conv.in_channels:
        raise ValueError(f"images have {C} channels but {label} has in_channels={conv.in_channels}")
    if conv.weight.shape[1] != C:
        raise ValueError(
            f"{label} is grouped (groups={conv.groups}): each filter sees {conv.weight.shape[1]} "
            f"channels, but Pre-Warm's centroids have the images' {C}; use a conv with groups=1"
        )
    if conv.weight.device != images.device:
        raise ValueError(
            f"model is on {conv.weight.device} but images are on {images.device}; "
            "move them to the same device"
        )
    x = to_float(images)
    if not all_finite(x):
        raise ValueError("images contain NaN or Inf")
    return x


def _value_range(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of x in one host read."""
    lo, hi = torch.stack(torch.aminmax(x)).tolist()
    return lo, hi


def _auto_n_patches(raw: torch.Tensor, value_range: tuple[float, float], n_filters: int,
                    patch: tuple[int, int]):
    """(n_patches, rule, statistic, τ*) by eq. 5 (one channel) or eq. 6 (several).

    ``value_range`` is raw's (min, max), already computed by the caller.
    """
    if raw.shape[1] == 1:
        tau_t = rules.otsu_threshold_on_device([raw], 256, *value_range)
        d_t = rules.foreground_density_on_device([raw], tau_t)
        tau, d = torch.stack([tau_t, d_t]).tolist()  # one host read
        if d == 0:
            raise ValueError(
                f"foreground density d = 0 (no pixel above Otsu's τ* = {tau:.4f}); "
                "eq. 5 is undefined: pass n_patches explicitly"
            )
        P, rule, stat, eq = rules.n_patches_grayscale(d, n_filters), "otsu", d, "eq. 5"
    else:
        tau, norm = None, rules.mean_patch_norm(raw, patch)
        P = rules.n_patches_color(norm, n_filters) if norm > 0 else 0
        rule, stat, eq = "patch_norm", norm, "eq. 6"
    if P < 1:
        raise ValueError(f"{eq} gives n_patches = {P} for {n_filters} filters and {rule} statistic "
                         f"{stat:.3g} (nearly constant images?); pass n_patches explicitly")
    return P, rule, stat, tau


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
        patch_size: defaults to the kernel size; larger patches are clustered and their centroids
            centre-cropped to the kernel (§4.3) before steps 4-5, so the written filters still
            have std σ; smaller ones are an error.
        raw_images: raw [0, 1] pixels for the rules (default ``images``): the same batch, or more
            images of the same (C, H, W), e.g. the whole training split; used only when
            ``n_patches="auto"``, with a warning when the values leave [0, 1].
        kmeans_options: keywords for :class:`~prewarm_gpu.MiniBatchKMeans` other than
            ``n_clusters``, ``init`` and ``random_state`` (default: Listing 1's ``n_init=3`` and
            scikit-learn's defaults), e.g. ``{"loop": "device"}`` to run the GPU's sync-free loop on
            the CPU.
        generator: ``None``, an ``int`` seed or a ``torch.Generator`` on the images' device.

    Returns:
        A :class:`PrewarmReport`.

    Example:
        >>> model = torchvision.models.resnet18()
        >>> report = prewarm_(model, images, generator=0)  # conv1: 7×7, stride 2
    """
    _warn_if_ddp(model)
    # images may require grad (nothing here is differentiated); an ambient autocast must not
    # lower the float64/float32 arithmetic Pre-Warm promises.
    with torch.no_grad(), no_autocast():
        return _prewarm(model, images, layer, n_clusters, n_patches, scale, patch_size,
                        raw_images, generator, kmeans_options=kmeans_options)


def _warn_if_ddp(model: nn.Module) -> None:
    """A ``DistributedDataParallel`` model (compiled or not) was wrapped already: DDP broadcast
    the parameters when it was built, so this rank's write would stay on this rank."""
    ddp = nn.parallel.DistributedDataParallel
    if isinstance(model, ddp) or isinstance(getattr(model, "_orig_mod", None), ddp):
        warnings.warn("prewarm_ on a DistributedDataParallel model writes this rank's filters "
                      "only (DDP broadcasts parameters when it is built): the ranks would train "
                      "different filters. Call prewarm_ before wrapping, or "
                      "prewarm_distributed_ (rank 0's filters on every rank)", stacklevel=3)


_KMEANS_FIXED = ("n_clusters", "init", "random_state")


def _kmeans(k: int, options: dict[str, Any] | None, g: torch.Generator) -> MiniBatchKMeans:
    """Listing 1's ``MiniBatchKMeans(k, n_init=3)`` with the caller's options, checked."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"kmeans_options must be a dict, got {type(options).__name__}")
    bad = [key for key in options if key in _KMEANS_FIXED]
    if bad:
        raise ValueError(f"kmeans_options cannot set {bad}: Pre-Warm sets {list(_KMEANS_FIXED)}")
    try:
        km = MiniBatchKMeans(k, random_state=g, **{"n_init": 3, **options})
    except TypeError as e:
        raise TypeError(f"kmeans_options: {e}") from None
    km.check_params()
    return km


@dataclass(frozen=True)
class PrewarmPlan:
    """What a Pre-Warm call will do, decided from the model and the batch's shape alone (no pixel
    value read): :func:`plan_prewarm`. ``n_patches`` is None where the rules (eq. 5/6) decide it
    on the pixels."""

    layer: str  # dotted name of the target conv
    conv: nn.Conv2d
    kernel: tuple[int, int]
    patch: tuple[int, int]  # ≥ the kernel; larger patches are centre-cropped (§4.3)
    dilation: tuple[int, int]
    n_clusters: int  # k
    n_patches: int | None  # per image; None: "auto"
    scale: float  # σ
    scale_rule: str  # "given" or "auto"
    kmeans_options: dict[str, Any] | None


def _check_patch_count(B: int, P: int, k: int, d: int, device: torch.device,
                       dtype: torch.dtype) -> None:
    """``B·P`` patches of ``d`` values: at least k of them, and a matrix that fits in memory."""
    if B * P < k:
        raise ValueError(f"{B} images × {P} patches = {B * P} patches, fewer than n_clusters={k}")
    _check_memory(B * P, d, device, dtype)


def plan_prewarm(conv: nn.Conv2d, name: str, batch_shape: tuple[int, int, int, int], *,
                 n_clusters: int | None = None,
                 n_patches: int | str = "auto", scale: float | str = "auto",
                 patch_size: int | tuple[int, int] | None = None,
                 kmeans_options: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 listing1: bool = False) -> PrewarmPlan:
    """Every check of :func:`prewarm_` that needs no pixel value, and what follows from them.

    For the target ``conv`` (named ``name``, found and checked by the caller: ``layers.find_conv``
    and ``_check_target``) and a batch of ``batch_shape`` (B, C, H, W): ``patch_size`` against
    the kernel and the images, ``n_clusters`` against the filters (``listing1``: as
    Listing 1, it may exceed them), ``kmeans_options``, an explicit ``n_patches`` against k and
    the memory of ``device`` (default: the conv's) for a patch matrix of ``dtype``, the distinct
    windows, and ``scale``. A ``ValueError``/``TypeError`` names what is wrong. The harness runs
    it for every arm of a sweep before any training (a model on the meta device will do).
    """
    B, C, H, W = batch_shape
    device = conv.weight.device if device is None else torch.device(device)
    F = conv.out_channels
    kernel = tuple(conv.kernel_size)
    patch = kernel if patch_size is None else as_pair(patch_size, "patch_size")
    if patch[0] < kernel[0] or patch[1] < kernel[1]:
        raise ValueError(f"patch_size {patch} is smaller than the kernel {kernel}")
    dil = tuple(conv.dilation)
    span = ((patch[0] - 1) * dil[0] + 1, (patch[1] - 1) * dil[1] + 1)
    if H < span[0] or W < span[1]:
        raise ValueError(f"images of {H}×{W} are smaller than the {span[0]}×{span[1]} patch")
    if C * patch[0] * patch[1] == 1:
        raise ValueError("a 1×1 patch of one channel is 0 after mean-centring, so Pre-Warm's "
                         "centroids would all be 0; it needs C·K_h·K_w > 1")
    k = F // 2 if n_clusters is None else check_int(
        "n_clusters", n_clusters, 1, None if listing1 else F)
    if k < 1:
        raise ValueError(f"n_clusters = ⌊F/2⌋ = 0 for a conv with out_channels={F}")
    _kmeans(k, kmeans_options, None)  # its options' errors now
    P = None
    if isinstance(n_patches, str) and n_patches != "auto":
        raise ValueError(f"n_patches must be an int or 'auto', got {n_patches!r}")
    if n_patches != "auto":
        P = check_int("n_patches", n_patches, 1)
        _check_patch_count(B, P, k, C * patch[0] * patch[1], device, dtype)
    positions = (H - span[0] + 1) * (W - span[1] + 1)
    if B * positions < k:
        raise ValueError(f"{B} images of {H}×{W} hold {B * positions} distinct {span[0]}×"
                         f"{span[1]} windows, fewer than n_clusters={k}: some filters would be "
                         "copies of others")
    if scale == "auto":
        sigma, scale_rule = rules.default_scale(C, kernel), "auto"
    elif is_real(scale) and scale > 0:
        sigma, scale_rule = float(scale), "given"
    else:
        raise ValueError(f"scale must be a finite number > 0 or 'auto', got {scale!r}")
    return PrewarmPlan(name, conv, kernel, patch, dil, k, P, sigma, scale_rule, kmeans_options)


def _check_raw(raw_images, x: torch.Tensor) -> None:
    if raw_images is None:
        return
    if not isinstance(raw_images, torch.Tensor):
        raise TypeError(f"raw_images must be a torch.Tensor, got {type(raw_images).__name__}")
    if raw_images.is_meta:
        raise ValueError("raw_images are on the meta device: they hold no values")
    if raw_images.dtype != torch.uint8 and not raw_images.is_floating_point():
        raise TypeError(f"raw_images must be floating point or uint8, got {raw_images.dtype}")
    if raw_images.ndim != 4 or raw_images.shape[1:] != x.shape[1:]:
        raise ValueError(f"raw_images must be images of the same shape as images' "
                         f"{tuple(x.shape[1:])} (any number of them); got "
                         f"{tuple(raw_images.shape)}")


def _rule_n_patches(images, raw_images, x: torch.Tensor, F: int, patch: tuple[int, int]):
    """``n_patches="auto"``: (n_patches, rule, statistic, τ*) on the raw pixels (Table 2)."""
    C = x.shape[1]
    raw = images if raw_images is None else raw_images
    if raw.ndim != 4 or raw.shape[1] != C or raw.numel() == 0:
        raise ValueError(f"raw_images must be a non-empty (N, {C}, H, W) tensor, got shape "
                         f"{tuple(raw.shape)}")
    raw = to_float(raw.to(x.device))
    lo, hi = _value_range(raw)  # NaN and ±Inf reach the min or the max
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("raw_images contain NaN or Inf")
    if lo < 0 or hi > 1:
        what = "`images`" if raw_images is None else "raw_images"
        warnings.warn(
            f"n_patches='auto' computes the paper's rules on {what}, whose values lie in "
            f"[{lo:.3g}, {hi:.3g}]: not raw [0, 1] pixels (standardised? 0-255?); pass "
            "raw_images= with raw [0, 1] pixels",
            stacklevel=4,  # the caller of prewarm_
        )
    return _auto_n_patches(raw, (lo, hi), F, patch)


def _prewarm(model, images, layer, n_clusters, n_patches, scale, patch_size, raw_images,
             generator, listing1=False, kmeans_options=None) -> PrewarmReport:
    """The pipeline: :func:`plan_prewarm`, the checks of the pixels and the rules, then steps
    1-5 and the write. ``listing1``: as Listing 1, ``n_clusters`` may exceed F; all are clustered
    and normalised together and the first ``min(n_clusters, F)`` are written."""
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}")
    name, conv = find_conv(model, images.shape[1], layer)
    _check_target(conv, name)
    x = _check_images(images, conv, name)
    plan = plan_prewarm(conv, name, tuple(x.shape), n_clusters=n_clusters,
                        n_patches=n_patches, scale=scale, patch_size=patch_size,
                        kmeans_options=kmeans_options, dtype=x.dtype, device=x.device,
                        listing1=listing1)
    B, C, H, W = x.shape
    F, k, patch, kernel, dil = conv.out_channels, plan.n_clusters, plan.patch, plan.kernel, \
        plan.dilation
    sigma, scale_rule = plan.scale, plan.scale_rule
    km = _kmeans(k, kmeans_options, as_generator(generator, x.device))
    _check_raw(raw_images, x)
    rule, stat, tau, P = "given", None, None, plan.n_patches
    if P is None:  # Rules (Table 2) on the raw pixels.
        P, rule, stat, tau = _rule_n_patches(images, raw_images, x, F, patch)
        _check_patch_count(B, P, k, C * patch[0] * patch[1], x.device, x.dtype)

    centroids = _cluster(km, x, patch, dil, P)
    centroids = centre_crop(centroids, C, patch, kernel)
    # Steps 4-5 in float64 (k filters: free) at unit σ, then σ, then one cast to the conv's
    # dtype. unit · σ is the same bits as normalising with σ directly (· 1.0 is exact); the
    # checks below judge the spread at unit scale, so a σ that over- or underflows is named as
    # the scale's fault, not the images'.
    unit = weight_and_normalise(centroids.to(torch.float64), kernel, C, 1.0)
    unit_kept = unit.reshape(k, C, *kernel)[: min(k, F)]  # k ≤ F but with listing1
    filters = (unit_kept * sigma).to(conv.weight.dtype)
    # The call's one read of the device's results: the checks before the write, and the report.
    c64 = centroids.to(torch.float64)
    copies = (torch.cdist(c64, c64) == 0).triu(1).any(0).sum()  # centroids equal to an earlier one
    x_max, c_max, norm, want, got, z_max, inertia, n_copies = torch.stack([
        x.abs().amax().to(torch.float64), centroids.abs().amax().to(torch.float64),
        unit.std(unbiased=False), unit_kept.std(unbiased=False),
        (filters.to(torch.float64) / sigma).std(unbiased=False), unit_kept.abs().amax(),
        km.inertia_tensor_, copies.to(torch.float64)]).tolist()
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
        fi = torch.finfo(conv.weight.dtype)
        what = (f"their std would be {got * sigma:g} instead of {sigma:g}" if math.isfinite(got)
                else "they would not be finite")
        raise ValueError(
            f"scale={sigma:g} does not fit the conv's {conv.weight.dtype} weights: it is "
            f"outside their usable range, about [{fi.smallest_normal:.3g}, "
            f"{fi.max / z_max:.3g}] for these filters (beyond it they underflow or overflow); "
            f"written, {what}")
    if n_copies:
        warnings.warn(f"only {k - int(n_copies)} distinct centroids of n_clusters={k}: the batch "
                      "has too few distinct patches, so some conditioned filters are copies",
                      stacklevel=3)
    conv.weight[: filters.shape[0]].copy_(filters)  # under prewarm_'s no_grad; queued, not awaited
    return PrewarmReport(
        layer=name, n_clusters=filters.shape[0], n_patches=P, patch_size=patch, scale=sigma,
        rule=rule, statistic=stat, otsu_threshold=tau, scale_rule=scale_rule, inertia=inertia,
        kmeans_steps=km.n_steps_, seconds=time.perf_counter() - t0,
    )


def _cluster(km: MiniBatchKMeans, x, patch, dil, n_patches):
    """Steps 1-3: extract, mean-centre, cluster with ``km``. Returns centroids (k, C·K_h·K_w)."""
    p = extract_patches(x, patch, n_patches, dilation=dil, generator=km.random_state)
    p -= p.mean(1, keepdim=True)  # in place: the patch matrix is the largest tensor of a call
    # p is valid (skip fit's checks) and ours: k-means may rescale it in place, no copy
    return km.fit_valid(p, overwrite_x=True).cluster_centers_


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
        _prewarm(model, batch_images, layer, n_clusters, n_patches, scale, patch_size, None, seed,
                 listing1=True)
    return model
