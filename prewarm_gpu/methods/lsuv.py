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

from ..checks import check_int, is_real
from ..registry import register
from ._common import (
    AFFINE,
    layerwise_scope,
    layerwise_setup,
    model_device,
    require_images,
    visit_in_execution_order,
)

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
    layers, images, g = layerwise_setup(model, images, generator, types=AFFINE, exclude=exclude,
                                        method="LSUV")
    variance: dict[str, float] = {}
    iterations: dict[str, int] = {}

    def scale_layer(name, module, args, output):
        output, variance[name], iterations[name] = _scale_to_unit_variance_(
            name, module, args, output, tol, max_iter)
        return output

    with layerwise_scope(model):
        if orthonormal:
            _orthonormal_layers_(layers, g)
        order = visit_in_execution_order(model, layers, scale_layer, images, "LSUV")
    return {
        "order": order,
        "variance": variance,
        "iterations": iterations,
        "converged": {n: abs(v - 1.0) < tol for n, v in variance.items()},
    }


def _orthonormal_layers_(layers: list[tuple[str, nn.Module]], g: torch.Generator) -> None:
    """The orthonormal pre-initialisation: every layer's weight, in selection order; zero biases."""
    for _, m in layers:
        orthonormal_(m.weight, generator=g)
        if m.bias is not None:
            m.bias.zero_()


def _scale_to_unit_variance_(name: str, module: nn.Module, args, output: torch.Tensor, tol: float,
                             max_iter: int) -> tuple[torch.Tensor, float, int]:
    """One layer's LSUV loop, inside its forward hook: ``(output, final Var, rescalings)``."""
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
    return output, var, it


@register("lsuv", options_of=lsuv_)
def lsuv(model: nn.Module, *, data=None, generator=None, **options) -> dict[str, Any]:
    """LSUV (:func:`lsuv_`) on ``data``.

    Options: ``tol``, ``max_iter``, ``orthonormal``, ``exclude``.
    """
    images = require_images(data, "lsuv", model_device(model))
    return lsuv_(model, images, generator=generator, **options)
