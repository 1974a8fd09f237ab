"""A randomised Gabor bank for the first conv layer.

`Gabor filters as initializers for convolutional neural networks: a study on inductive bias and
performance on image classification` - Rivas, P. & Rai, M. (LatinX in AI @ ICML 2023); the
randomised bank as Ulm et al. (`Learning an informed CNN initialization`) use it as a baseline:

.. math::
    g(x, y) = \\exp\\Big(-\\frac{x'^2 + \\gamma^2 y'^2}{2\\sigma^2}\\Big)
              \\cos\\Big(2\\pi \\frac{x'}{\\lambda} + \\psi\\Big),\\quad
    x' = x\\cos\\theta + y\\sin\\theta,\\ y' = -x\\sin\\theta + y\\cos\\theta,

one draw per output filter of σ ~ U(1.5, 2.5), θ ~ U(0, π), λ ~ U(2, 13), ψ ~ U(0, 2π),
γ ~ U(0.9, 1.1). Fixed here (Ulm et al.'s code has no normalisation and an off-centre grid,
``np.linspace(-size//2, size//2, size)`` = [-2, -0.5, 1] for size 3):

- a centred grid ``x = arange(k_w) - (k_w - 1)/2`` (columns), ``y = arange(k_h) - (k_h - 1)/2``
  (rows), so rectangular kernels work and θ = 0 is symmetric about the kernel centre;
- every filter has zero mean (a Gabor's DC response would make the layer a blur of brightness);
- the whole bank is scaled to the Kaiming std ``sqrt(2 / fan_in)``, ``fan_in = C_in·k_h·k_w``
  (one global factor, so the relative amplitudes of the draws are kept);
- the same 2-D filter on every input channel of an output filter (as Ulm et al.; for colour input
  a luminance-like filter), drawn from the given generator.

Only the weights of that one layer change; its bias and every other layer are left as they are.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._random import as_generator
from ..layers import find_conv
from ..registry import register

__all__ = ["gabor_", "gabor_kernels", "gabor"]

RANGES = {
    "sigma": (1.5, 2.5),
    "theta": (0.0, math.pi),
    "lambd": (2.0, 13.0),
    "psi": (0.0, 2.0 * math.pi),
    "gamma": (0.9, 1.1),
}


def gabor_kernels(sigma, theta, lambd, psi, gamma, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Gabor kernels (n, k_h, k_w) for parameter vectors (n,) on a centred grid (Rivas & Rai 2023).

    .. math::
        g = \\exp(-(x'^2 + \\gamma^2 y'^2) / 2\\sigma^2)\\, \\cos(2\\pi x'/\\lambda + \\psi)

    Examples:
        >>> one = torch.ones(1)
        >>> gabor_kernels(2 * one, 0 * one, 4 * one, 0 * one, one, (3, 3)).shape
        torch.Size([1, 3, 3])
    """
    kh, kw = kernel_size
    opts = {"device": sigma.device, "dtype": sigma.dtype}
    y = (torch.arange(kh, **opts) - (kh - 1) / 2).view(1, kh, 1)
    x = (torch.arange(kw, **opts) - (kw - 1) / 2).view(1, 1, kw)
    sigma, theta, lambd, psi, gamma = (p.view(-1, 1, 1) for p in (sigma, theta, lambd, psi, gamma))
    xr = x * theta.cos() + y * theta.sin()
    yr = -x * theta.sin() + y * theta.cos()
    envelope = torch.exp(-(xr.square() + gamma.square() * yr.square()) / (2 * sigma.square()))
    return envelope * torch.cos(2 * math.pi * xr / lambd + psi)


def _uniform(n: int, low: float, high: float, g: torch.Generator, like: torch.Tensor):
    u = torch.rand(n, generator=g, device=like.device, dtype=torch.float64)
    return low + (high - low) * u


def gabor_(
    weight: torch.Tensor,
    *,
    sigma: tuple[float, float] = RANGES["sigma"],
    theta: tuple[float, float] = RANGES["theta"],
    lambd: tuple[float, float] = RANGES["lambd"],
    psi: tuple[float, float] = RANGES["psi"],
    gamma: tuple[float, float] = RANGES["gamma"],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill a conv weight (out, in, k_h, k_w) with zero-mean random Gabors at the Kaiming std.

    .. math::
        W_{o,c} = \\sqrt{2/\\text{fan\\_in}}\\;
                  \\frac{g_o - \\bar g_o}{\\operatorname{std}(\\{g_{o'} - \\bar g_{o'}\\})}

    Args:
        weight: a 4-D conv weight; every input channel of filter o gets the same ``g_o``.
        sigma, theta, lambd, psi, gamma: (low, high) of each parameter's uniform distribution.
        generator: a ``torch.Generator`` on the weight's device (``None``: torch's default).

    Examples:
        >>> w = gabor_(torch.empty(32, 1, 3, 3), generator=torch.Generator().manual_seed(0))
        >>> round(float(w.std(unbiased=False)), 4)  # sqrt(2 / 9)
        0.4714
    """
    if weight.ndim != 4:
        raise ValueError(f"gabor_ needs a 4-D conv weight, got shape {tuple(weight.shape)}")
    out, cin, kh, kw = weight.shape
    if kh * kw < 2:
        raise ValueError(f"a {kh}×{kw} kernel has no zero-mean Gabor filter; need at least 2 taps")
    ranges = {"sigma": sigma, "theta": theta, "lambd": lambd, "psi": psi, "gamma": gamma}
    for name, (lo, hi) in ranges.items():
        if not lo <= hi:
            raise ValueError(f"{name} range must be (low, high) with low <= high, got {(lo, hi)}")
    if not (sigma[0] > 0 and lambd[0] > 0):
        raise ValueError(f"sigma and lambd must be positive, got sigma={sigma}, lambd={lambd}")
    params = [_uniform(out, lo, hi, generator, weight) for lo, hi in ranges.values()]
    g = gabor_kernels(*params, (kh, kw))
    g = g - g.mean((1, 2), keepdim=True)
    std = g.std(unbiased=False)
    if not std > 0:
        raise ValueError("every drawn Gabor filter is constant; widen the parameter ranges")
    g = g * (math.sqrt(2.0 / (cin * kh * kw)) / std)
    with torch.no_grad():
        weight.copy_(g.unsqueeze(1).expand(out, cin, kh, kw))
    return weight


@register("gabor", options_of=RANGES)
def gabor(model: nn.Module, *, data=None, generator=None, layer: str | None = None,
          **ranges) -> dict[str, Any]:
    """Gabor bank (:func:`gabor_`) in the first Conv2d (registration order) or the named ``layer``.

    Needs no data. Options: ``layer``, and ``sigma``/``theta``/``lambd``/``psi``/``gamma`` ranges.
    """
    unknown = sorted(set(ranges) - set(RANGES))
    if unknown:
        raise TypeError(f"gabor got unknown options {unknown}; known: layer, {sorted(RANGES)}")
    name, conv = find_conv(model, None, layer)
    g = as_generator(generator, conv.weight.device)
    gabor_(conv.weight, generator=g, **ranges)
    return {"layer": name, "std": float(conv.weight.detach().double().std(unbiased=False))}
