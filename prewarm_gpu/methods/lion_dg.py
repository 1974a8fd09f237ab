"""LION-DG: zero-initialised auxiliary heads for deeply-supervised networks, and the LSUV hybrid.

`LION-DG: Layer-Informed Initialization with Deep Gradient Protocols` (arXiv 2601.02105). The last
affine layer (weight and bias) of every auxiliary classifier head is zero; the backbone gets He
init (``kaiming_normal_``, fan_in, ReLU gain; biases 0). With ``a = W h + b`` the head's logits,

.. math::
    W = 0,\\ b = 0 \\ \\Rightarrow\\
    \\frac{\\partial \\mathcal L_{aux}}{\\partial h}
    = W^\\top \\frac{\\partial \\mathcal L_{aux}}{\\partial a} = 0,

so at step 0 the auxiliary losses send no gradient into the backbone or the head's inner layers;
only ``W`` and ``b`` themselves get one (``∂L/∂W = (p - y) hᵀ``), and the auxiliary gradients phase
in as they grow ("gradient awakening"). Only the *last* layer is zeroed: zeroing every layer of a
multi-layer head would leave its inner layers without gradient for good.

:class:`DSSimpleCNN` is SimpleCNN (§3.1 of the Pre-Warm paper) with a head after each conv block;
the harness adds ``aux_weight · Σ CE(aux_logits)`` (0.3 by default) to the loss.
``lsuv_lion_dg`` is LSUV with the zeroed layers excluded (their output variance is 0, so LSUV's
scale would blow up), then the zeroing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._random import as_generator
from ..models import DS_SIMPLECNN, DSSimpleCNN, aux_head
from ..registry import register
from ._common import AFFINE, check_names, model_device, require_images, rollback
from .lsuv import lsuv_

__all__ = ["DSSimpleCNN", "aux_head", "head_last_layers", "zero_aux_heads_", "lion_dg_",
           "lion_dg", "lsuv_lion_dg"]

MODEL_NAME = DS_SIMPLECNN  # the architecture lion_dg needs


def _heads(model: nn.Module, heads: Iterable[str] | None) -> list[tuple[str, nn.Module]]:
    if heads is not None:
        names = check_names(model, heads, "heads")
        found = [(n, model.get_submodule(n)) for n in names]
    else:
        aux = getattr(model, "aux_heads", None) or []
        found = [(f"aux_heads.{i}", h) for i, h in enumerate(aux)]
    if not found:
        raise ValueError(
            f"LION-DG needs a deeply-supervised model: {type(model).__name__} has no `aux_heads` "
            f"(build '{MODEL_NAME}') and no heads= names were given"
        )
    return found


def head_last_layers(model: nn.Module, heads: Iterable[str] | None = None) -> list[str]:
    """Names of the last affine (Conv/Linear) layer of each auxiliary head (registration order)."""
    out = []
    for name, head in _heads(model, heads):
        last = [n for n, m in head.named_modules() if isinstance(m, AFFINE)]
        if not last:
            raise ValueError(f"LION-DG: head {name!r} has no Conv/Linear layer to zero")
        out.append(f"{name}.{last[-1]}" if last[-1] else name)
    return out


def zero_aux_heads_(model: nn.Module, heads: Iterable[str] | None = None) -> list[str]:
    """Zero weight and bias of the last affine layer of each auxiliary head; returns their names."""
    names = head_last_layers(model, heads)
    with torch.no_grad():
        for n in names:
            m = model.get_submodule(n)
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()
    return names


def lion_dg_(model: nn.Module, *, heads: Iterable[str] | None = None,
             generator: int | torch.Generator | None = None) -> dict[str, Any]:
    """LION-DG in place: He init (fan_in, ReLU) of every other Conv/Linear, zero head outputs.

    .. math::
        W \\sim \\mathcal N(0, 2/\\text{fan\\_in}),\\ b = 0 \\ \\text{(backbone)};\\qquad
        W_{\\text{head,last}} = 0,\\ b_{\\text{head,last}} = 0

    Args:
        model: a deeply-supervised network with ``aux_heads`` (or name them with ``heads``).
        heads: names of the auxiliary head modules (default: ``model.aux_heads``).
        generator: ``None``, an ``int`` seed or a ``torch.Generator`` on the model's device.

    Examples:
        >>> lion_dg_(DSSimpleCNN(1, 10, 28), generator=0)["zeroed"]
        ['aux_heads.0.4', 'aux_heads.1.4']
    """
    zeroed = head_last_layers(model, heads)
    g = as_generator(generator, model_device(model))
    he = [(n, m) for n, m in model.named_modules() if isinstance(m, AFFINE) and n not in zeroed]
    with torch.no_grad():
        for _, m in he:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=g)
            if m.bias is not None:
                m.bias.zero_()
        zero_aux_heads_(model, zeroed)
    return {"zeroed": zeroed, "he": [n for n, _ in he]}


@register("lion_dg")
def lion_dg(model: nn.Module, *, data=None, generator=None, heads=None) -> dict[str, Any]:
    """LION-DG (:func:`lion_dg_`): needs no data; option ``heads``."""
    return lion_dg_(model, heads=heads, generator=generator)


@register("lsuv_lion_dg", options_of=lsuv_)
def lsuv_lion_dg(model: nn.Module, *, data=None, generator=None, heads=None,
                 exclude: Iterable[str] = (), **lsuv_options) -> dict[str, Any]:
    """LSUV (:func:`~prewarm_gpu.methods.lsuv.lsuv_`) but the heads' last layers, then zero them.

    The heads' inner layers take part in LSUV (the heads run: LSUV uses the training path).
    Options: ``heads``, and LSUV's ``tol``, ``max_iter``, ``orthonormal``, ``exclude``.
    """
    images = require_images(data, "lsuv_lion_dg", model_device(model))
    zeroed = head_last_layers(model, heads)
    exclude = check_names(model, exclude, "exclude")
    with rollback(model):
        report = lsuv_(model, images, exclude=[*exclude, *zeroed], generator=generator,
                       **lsuv_options)
        zero_aux_heads_(model, zeroed)
    return {**report, "zeroed": zeroed}


lion_dg.requires_model = MODEL_NAME
lsuv_lion_dg.requires_model = MODEL_NAME
