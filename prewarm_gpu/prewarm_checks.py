"""Pre-Warm's checks of its inputs: the target conv, the images, the raw images for the rules, and
the memory the patch matrix needs. Each raises a ``ValueError``/``TypeError`` that says what was
given and what was expected, before the model is touched.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from .checks import all_finite, to_float
from .layers import conv_label, refuse_lazy


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
                      "the written filters' std σ may not be what the layer uses",
                      stacklevel=4)  # the caller of prewarm_ (through resolve_prewarm)
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


def _check_raw(raw_images, x: torch.Tensor) -> None:
    """``raw_images`` (None, or images with the values the rules read) against the checked
    images x: a tensor of real pixels, of x's (C, H, W), any number of them."""
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


def _check_patch_count(B: int, P: int, k: int, d: int, device: torch.device,
                       dtype: torch.dtype) -> None:
    """``B·P`` patches of ``d`` values: at least k of them, and a matrix that fits in memory."""
    if B * P < k:
        raise ValueError(f"{B} images × {P} patches = {B * P} patches, fewer than n_clusters={k}")
    _check_memory(B * P, d, device, dtype)


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
