"""LSUV: layer-sequential unit-variance initialisation.

`All you need is a good init` - Mishkin, D. & Matas, J. (ICLR 2016). Orthonormal pre-initialisation
(Saxe et al. 2014), then, for each conv/linear layer L from input to output, repeat

.. math::
    W_L \\leftarrow W_L / \\sqrt{\\operatorname{Var}(B_L)} \\quad\\text{until}\\quad
    |\\operatorname{Var}(B_L) - 1| < \\text{tol} \\ \\text{or}\\ T_{\\max} \\text{ steps,}

where ``B_L`` is the layer's own output on one batch (the variance over every element; one scalar
per layer; weights only). Defaults are the reference code's (``ducha-aiki/LSUVinit``: margin 0.02,
20 iterations).

What the public code gets wrong, and what is done here instead:

- *Order*: layers are visited in **execution order**, by forward hooks on one forward pass — not in
  ``model.apply`` (registration) order, wrong for e.g. ResNet downsample convs. Each layer is
  scaled inside its own hook, on the real input produced by the already-initialised layers below,
  and its rescaled output is what the rest of the pass sees, so one pass does what the reference
  does with one pass per iteration per layer. Every selected layer must run (checked).
- *Measurement*: the statistic is taken from the layer's own output inside its hook, before any
  in-place activation after it can modify that tensor.
- *BatchNorm*: in eval mode during LSUV (so it neither cancels the scaling nor updates its
  buffers; a fresh BatchNorm is then ≈ the identity); its buffers are saved and restored, and every
  module's train/eval mode is restored afterwards. Dropout is off. Note that in *training* a
  BatchNorm after a conv re-normalises its output, so LSUV's scale of such a conv only matters
  through BatchNorm's ``eps``; its orthonormal directions still do.
- Biases are zeroed by the orthonormal pre-initialisation (as the reference does).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._random import as_generator
from ..checks import check_int, is_real
from ..precision import float32_scope
from ..registry import register
from ._common import (
    AFFINE,
    first_call,
    forward_with_hooks,
    measurement_mode,
    model_device,
    require_images,
    rollback,
)
from ._common import select_layers as _select

__all__ = ["lsuv_", "orthonormal_", "lsuv"]


def orthonormal_(weight: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``weight`` (out, ...) with a (semi-)orthonormal matrix of shape (out, fan_in).

    `Exact solutions to the nonlinear dynamics of learning in deep linear neural networks` - Saxe et
    al. (2014): the Q factor of the QR decomposition of a standard Gaussian matrix (sign-corrected,
    so Haar-distributed); rows orthonormal when out ≤ fan_in, columns otherwise.
    """
    return nn.init.orthogonal_(weight, gain=1.0, generator=generator)


def _variance(t: torch.Tensor) -> float:
    return float(t.detach().double().var(unbiased=False))


def lsuv_(
    model: nn.Module,
    images: torch.Tensor,
    *,
    tol: float = 0.02,
    max_iter: int = 20,
    orthonormal: bool = True,
    exclude: Iterable[str] = (),
    generator: int | torch.Generator | None = None,
) -> dict[str, Any]:
    """LSUV (Mishkin & Matas 2016) of every Conv1d/2d/3d and Linear layer of ``model``, in place.

    .. math::
        W_L \\leftarrow W_L / \\sqrt{\\operatorname{Var}(W_L \\star x_L)}\\ \\text{ until }
        |\\operatorname{Var} - 1| < \\text{tol}

    Args:
        model: the network; its mode and BatchNorm buffers are restored afterwards.
        images: one batch as the network sees it (standardised), on the model's device.
        tol: stop when ``|Var(output) - 1| < tol`` (reference margin 0.02).
        max_iter: at most this many rescalings per layer (reference 20).
        orthonormal: orthonormal pre-initialisation (and zero biases) first; ``False`` keeps the
            current weights and only rescales them.
        exclude: names of modules left untouched (a name covers its submodules).
        generator: ``None``, an ``int`` seed or a ``torch.Generator`` on the model's device.

    Returns:
        ``{"order": [names in execution order], "variance": {name: final Var}, "iterations":
        {name: rescalings}, "converged": {name: bool}}``.

    Examples:
        >>> report = lsuv_(model, images, generator=0)
        >>> report["order"]
        ['conv1', 'conv2', 'fc1', 'fc2']
    """
    if not (is_real(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    check_int("max_iter", max_iter, 0)
    layers = _select(model, AFFINE, exclude)
    if not layers:
        raise ValueError(
            f"LSUV found no Conv1d/Conv2d/Conv3d/Linear layer to initialise in "
            f"{type(model).__name__}"
            + (f" (excluded: {list(exclude)})" if exclude else "")
        )
    device = model_device(model)
    g = as_generator(generator, device)
    images = images.to(device)

    order: list[str] = []
    variance: dict[str, float] = {}
    iterations: dict[str, int] = {}

    def scale_layer(name, module, args, output):
        var, it = _variance(output), 0
        while abs(var - 1.0) >= tol and it < max_iter:
            if not math.isfinite(var) or var <= 0.0:
                raise ValueError(
                    f"LSUV: the output variance of layer {name!r} is {var}; it cannot be scaled to "
                    "1 (a zero or constant layer?); exclude it"
                )
            module.weight.mul_(1.0 / math.sqrt(var))
            output = module.forward(*args)  # forward(), not __call__: no hooks
            var, it = _variance(output), it + 1
        order.append(name)
        variance[name] = var
        iterations[name] = it
        return output

    hook_for = first_call(scale_layer)
    # IEEE fp32 (no TF32 convolutions on CUDA): the variances are measured, not approximated.
    with torch.no_grad(), rollback(model), measurement_mode(model), float32_scope("ieee"):
        if orthonormal:
            for _, m in layers:
                orthonormal_(m.weight, generator=g)
                if m.bias is not None:
                    m.bias.zero_()
        forward_with_hooks(model, layers, hook_for, images, "LSUV")
    return {
        "order": order,
        "variance": variance,
        "iterations": iterations,
        "converged": {n: abs(v - 1.0) < tol for n, v in variance.items()},
    }


@register("lsuv", options_of=lsuv_)
def lsuv(model: nn.Module, *, data=None, generator=None, **options) -> dict[str, Any]:
    """LSUV (:func:`lsuv_`) on ``data``.

    Options: ``tol``, ``max_iter``, ``orthonormal``, ``exclude``.
    """
    images = require_images(data, "lsuv", model_device(model))
    return lsuv_(model, images, generator=generator, **options)
