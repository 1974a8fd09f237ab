"""What a Pre-Warm call will do, decided before any patch is drawn: every check, and the rules.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), Table 2. :func:`plan_prewarm` is the part that reads no pixel value (the target conv, the
batch's shape, the options: a :class:`PrewarmPlan`); the harness runs it for every arm before any
training. :func:`resolve_prewarm` is a whole call's: the model and the images checked, the plan,
the random source, and ``n_patches="auto"`` decided by eq. 5 (one channel: Otsu's foreground
density) or eq. 6 (several: the mean patch norm) on the raw pixels: a frozen
:class:`ResolvedPrewarm` that :func:`prewarm_gpu.prewarm_` then applies.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from . import rules
from ._random import as_generator
from .checks import as_pair, check_int, is_real, to_float
from .kmeans import MiniBatchKMeans
from .layers import find_conv
from .prewarm_checks import _check_images, _check_patch_count, _check_raw, _check_target

__all__ = ["PrewarmPlan", "plan_prewarm", "ResolvedPrewarm", "resolve_prewarm"]


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
    listing1: bool = False  # Listing 1's mode: n_clusters may exceed the conv's filters

    @property
    def n_written(self) -> int:
        """Filters written, ``[0, n_written)``: k, or the conv's F in Listing 1's mode (all k
        centroids are clustered and normalised together, the first F written)."""
        return min(self.n_clusters, self.conv.out_channels)


def plan_prewarm(conv: nn.Conv2d, name: str, batch_shape: tuple[int, int, int, int], *,
                 n_clusters: int | None = None,
                 n_patches: int | str = "auto", scale: float | str = "auto",
                 patch_size: int | tuple[int, int] | None = None,
                 kmeans_options: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 listing1: bool = False) -> PrewarmPlan:
    """Every check of :func:`~prewarm_gpu.prewarm_` that needs no pixel value, and what follows.

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
    return PrewarmPlan(name, conv, kernel, patch, dil, k, P, sigma, scale_rule, kmeans_options,
                       listing1)


@dataclass(frozen=True)
class ResolvedPrewarm:
    """A Pre-Warm call with every decision made and every input checked: :func:`resolve_prewarm`.
    What is left is to draw, cluster and write (:func:`prewarm_gpu.prewarm._apply`)."""

    plan: PrewarmPlan  # n_patches known (given, or by the rules)
    x: torch.Tensor  # the images as float (≥ float32), on the model's device
    generator: torch.Generator  # the call's one random source, on the images' device
    rule: str  # how n_patches was chosen: "given", "otsu" (eq. 5) or "patch_norm" (eq. 6)
    statistic: float | None  # d (otsu) or the mean patch norm (patch_norm)
    otsu_threshold: float | None  # τ* (otsu rule)
    started: float  # time.perf_counter() when the call began (the report's seconds)


def resolve_prewarm(model: nn.Module, images: torch.Tensor, *, layer: str | None = None,
                    n_clusters: int | None = None, n_patches: int | str = "auto",
                    scale: float | str = "auto",
                    patch_size: int | tuple[int, int] | None = None,
                    raw_images: torch.Tensor | None = None,
                    kmeans_options: dict[str, Any] | None = None,
                    generator: int | torch.Generator | None = None,
                    listing1: bool = False) -> ResolvedPrewarm:
    """Every check of :func:`prewarm_gpu.prewarm_` and its rules, in the order they report: the
    model and images, the target conv (found by ``layers.find_conv``), :func:`plan_prewarm`, the
    generator, ``raw_images``, then ``n_patches="auto"`` on the raw pixels (Table 2) and its patch
    count. The arguments are :func:`~prewarm_gpu.prewarm_`'s; ``listing1``: Listing 1's mode
    (``n_clusters`` may exceed the conv's filters)."""
    started = time.perf_counter()
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
    g = as_generator(generator, x.device)
    _check_raw(raw_images, x)
    rule, stat, tau, P = "given", None, None, plan.n_patches
    if P is None:  # Rules (Table 2) on the raw pixels.
        P, rule, stat, tau = _rule_n_patches(images, raw_images, x, conv.out_channels, plan.patch)
        B, C = x.shape[:2]
        _check_patch_count(B, P, plan.n_clusters, C * plan.patch[0] * plan.patch[1], x.device,
                           x.dtype)
    return ResolvedPrewarm(replace(plan, n_patches=P), x, g, rule, stat, tau, started)


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
            stacklevel=4,  # the caller of prewarm_ (through resolve_prewarm)
        )
    return _auto_n_patches(raw, (lo, hi), F, patch)


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
