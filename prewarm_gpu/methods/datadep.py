"""Data-dependent initialisation of Conv2d and Linear layers.

`Data-dependent Initializations of Convolutional Neural Networks` - Krähenbühl, Doersch, Donahue &
Darrell (ICLR 2016); reference code ``philkr/magic_init`` (Caffe).

**Within-layer** (§3.1), for each layer k in execution order, on the real input produced by the
already-initialised layers below:

1. weights from the layer's own input rows ``D`` (conv: every patch the layer sees, by
   :func:`torch.nn.functional.unfold` with its kernel/padding/stride/dilation; Linear: its input
   vectors): ``gaussian`` (N(0, 1), the paper's "random"), ``pca`` (``S Vᵀ``: the top principal
   directions of ``D`` scaled by ``S = 1/sqrt(s + 1e-3)``) or ``kmeans`` (whiten ``D`` with ``V S``,
   L2-normalise the rows, :class:`prewarm_gpu.MiniBatchKMeans` with ``batch_size = 10·out``, map the
   centres back with ``S Vᵀ``);
2. per unit i, with μ_i, σ_i the mean and std of its pre-activation on the batch,

   .. math::
       W_{i\\cdot} \\leftarrow W_{i\\cdot} / \\sigma_i, \\qquad
       b_i \\leftarrow \\beta - \\mu_i / \\sigma_i, \\quad \\beta = 0.1,

   so every unit starts with mean β and standard deviation 1.

**Between-layer** (§3.2): at most ``max_rounds`` rounds of: a backward pass of random N(0, 1) top
gradients, the per-layer ratio ``r_k = sqrt(mean(∇W_k²) / mean(W_k²))``, and a rescaling
``W_k ← α_k W_k`` with ``α_k = sqrt(r_k / r̄)``, ``r̄`` the geometric mean of the ``r_k``, which
sets every ``r_k`` to ``r̄`` (the layers then learn at the same rate). Biases follow the scale
change of their input (measured as the ratio of mean |input|, as the reference does) and the
layer's own α, so a ReLU/max-pool network's pre-activations are only multiplied by constants and,
as ``∏ α_k = 1``, its output is unchanged. Stops when every
``|log r_k - log r̄| < tol·max(1, |log r̄|)`` (the reference's ``|log r_k / log r̄ - 1| < 0.01``,
guarded against ``r̄ ≈ 1``). One random draw per round (as the reference) estimates ``log r_k``
to about ±0.1 on a 256-image batch, so the rounds often run to ``max_rounds`` and the ratios end
equal to within that noise (``converged`` in the report says which).

Choices stated (the original supports neither BatchNorm nor DAGs):

- **BatchNorm** is in eval mode throughout (a fresh one is ≈ the identity, so the statistics above
  are the conv's own), its buffers saved and restored, every module's mode restored. In training a
  BatchNorm after a conv re-normalises it, so only the weights' directions then matter.
- **No bias**: a layer built with ``bias=False`` gets only ``W /= σ`` (no mean shift); it is
  listed under ``no_bias`` in the report.
- **Fallbacks to gaussian** (reported per layer): grouped/depthwise convs (too few input dimensions
  per output, as the notes of the reference say), fewer input rows than outputs, constant input.
  With more outputs than input dimensions, ``pca`` fills the missing components with Gaussian
  rows. Conv1d/Conv3d layers are left untouched (listed under ``skipped``).
- Layers that receive no gradient from the output (e.g. auxiliary heads) are left out of the
  between-layer ratios; their weights are divided by their input's scale change so that their
  pre-activations stay as the within-layer step set them.
- Eigenpairs are those of the covariance ``DᵀD / n`` (ε = 1e-3 is then relative to unit-variance
  inputs rather than to the number of rows); at most ``max_samples`` rows (drawn with the
  generator) feed PCA and k-means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from ..kmeans import MiniBatchKMeans
from ..registry import register
from ._common import (
    AFFINE,
    layerwise_scope,
    layerwise_setup,
    model_device,
    require_images,
    select_layers,
    visit_in_execution_order,
)

__all__ = ["datadep_", "layer_inputs", "VARIANTS", "datadep"]

VARIANTS = ("kmeans", "pca", "gaussian")
_LAYERS = (nn.Conv2d, nn.Linear)
_EPS = 1e-3  # the reference's whitening regulariser


def layer_inputs(module: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by its weight: (n, in·kh·kw) patches or (n, in) vectors.

    For a Conv2d, ``layer_inputs(conv, x) @ conv.weight.flatten(1).T`` is the conv's output without
    bias, position by position (its padding mode, padding, stride and dilation are followed).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _principal(D: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred rows, the top-m principal directions V (d, m) and S = 1/sqrt(s + ε) (0 if s ≈ 0)."""
    Dc = D.double() - D.double().mean(0)
    _, sv, Vh = torch.linalg.svd(Dc, full_matrices=False)
    s = sv.square() / D.shape[0]  # eigenvalues of the covariance, descending
    s, V = s[:m], Vh[:m].T
    keep = s > 1e-6 * s[0].clamp_min(torch.finfo(s.dtype).tiny)
    S = torch.where(keep, (s.clamp_min(0) + _EPS).rsqrt(), torch.zeros_like(s))
    return Dc, V, S


def _gaussian(n_out: int, d: int, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n_out, d, generator=g, device=like.device, dtype=torch.float64)


def _pca_weights(D: torch.Tensor, n_out: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """``S Vᵀ``; rows for null or missing components are Gaussian. Returns (W, Gaussian rows)."""
    _, V, S = _principal(D, min(n_out, D.shape[1]))
    W = S[:, None] * V.T
    dead = S == 0
    W[dead] = _gaussian(int(dead.sum()), D.shape[1], D, g)
    extra = n_out - W.shape[0]
    if extra > 0:
        W = torch.cat([W, _gaussian(extra, D.shape[1], D, g)])
    return W, int(dead.sum()) + max(extra, 0)


def _kmeans_weights(D: torch.Tensor, n_out: int, g: torch.Generator) -> torch.Tensor:
    """k-means on whitened, L2-normalised rows; centres mapped back to input space by ``S Vᵀ``."""
    Dc, V, S = _principal(D, min(n_out, D.shape[1]))
    wD = (Dc @ V) * S
    wD = wD / wD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    km = MiniBatchKMeans(n_out, batch_size=10 * n_out, random_state=g).fit(wD.float())
    return km.cluster_centers_.double() @ (S[:, None] * V.T)


def _unit_dims(module: nn.Module, out: torch.Tensor) -> tuple[int, ...]:
    if isinstance(module, nn.Conv2d):
        return (0, 2, 3) if out.ndim == 4 else (1, 2)  # batched or unbatched input
    return tuple(range(out.ndim - 1))


def _init_weight_(module, x, variant, max_samples, g) -> str:
    """Write the within-layer weights (step 1) and zero the bias; returns what was used."""
    n_out = module.weight.shape[0]
    how = variant
    if variant != "gaussian" and isinstance(module, nn.Conv2d) and module.groups > 1:
        how = f"gaussian (fallback: groups={module.groups})"
    D = layer_inputs(module, x) if how == variant and variant != "gaussian" else None
    if D is not None and D.shape[0] > max_samples:
        D = D[torch.randperm(D.shape[0], generator=g, device=D.device)[:max_samples]]
    if D is not None and D.shape[0] < max(n_out, 2):
        how = f"gaussian (fallback: {D.shape[0]} input rows < {n_out} outputs)"
    elif D is not None and bool((D == D[:1]).all()):
        how = "gaussian (fallback: constant input)"
    if how.startswith("gaussian"):
        W = _gaussian(n_out, module.weight[0].numel(), module.weight, g)
    elif variant == "pca":
        W, n_gauss = _pca_weights(D, n_out, g)
        if n_gauss:
            how = f"pca ({n_gauss} of {n_out} rows gaussian)"
    else:
        W = _kmeans_weights(D, n_out, g)
    module.weight.copy_(W.reshape(module.weight.shape))
    if module.bias is not None:
        module.bias.zero_()
    return how


def _standardise_(module, x, beta) -> torch.Tensor:
    """Step 2: each unit's pre-activation to mean β (if the layer has a bias) and std 1."""
    out = module.forward(x)
    dims = _unit_dims(module, out)
    mu = out.double().mean(dims)
    sd = out.double().std(dims, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))  # a dead unit keeps its scale
    module.weight.div_(sd.to(module.weight.dtype).view(-1, *[1] * (module.weight.ndim - 1)))
    if module.bias is not None:
        module.bias.copy_(beta - mu / sd)
    return module.forward(x)


def _mean_abs(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().mean())


def _record_scale(name: str, in_scale: dict[str, float]):
    """Forward pre-hook: mean |input| of the layer's first call."""

    def hook(module, args):
        in_scale.setdefault(name, _mean_abs(args[0]))

    return hook


def _rescale(name: str, in_scale: dict[str, float], alpha: dict[str, float], done: set[str]):
    """Forward pre-hook: correct the bias for the input's scale change, then scale by α (§3.2).

    A layer off the output's path (no α) divides its weight by the input's scale change instead,
    which keeps its pre-activation as the within-layer step left it.
    """

    def hook(module, args):
        if name in done:  # a shared module is rescaled once
            return
        done.add(name)
        cur = _mean_abs(args[0])
        adj = cur / in_scale[name] if in_scale.get(name, 0) > 0 else 1.0
        if name in alpha:
            if module.bias is not None:
                module.bias.mul_(adj * alpha[name])
            module.weight.mul_(alpha[name])
        elif adj > 0:
            module.weight.div_(adj)
        in_scale[name] = cur

    return hook


def _forward(model, images, layers, make_hook) -> torch.Tensor:
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers]
    try:
        return model(images)
    finally:
        for h in handles:
            h.remove()


def _gradient_ratios(model, images, layers, g, in_scale) -> dict[str, float]:
    """r_k = sqrt(mean(∇W_k²) / mean(W_k²)) under random N(0, 1) top gradients (layers with one)."""
    trainable = [(n, m) for n, m in layers if m.weight.requires_grad]
    with torch.enable_grad():
        out = _forward(model, images, layers, lambda n: _record_scale(n, in_scale))
        if not isinstance(out, torch.Tensor):
            raise TypeError("datadep's between-layer step needs a model whose forward returns a "
                            f"tensor, got {type(out).__name__}")
        top = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
        grads = torch.autograd.grad(out, [m.weight for _, m in trainable], top, allow_unused=True)
    return {
        n: math.sqrt(float(gr.double().square().mean() / m.weight.double().square().mean()))
        for (n, m), gr in zip(trainable, grads, strict=True)
        if gr is not None and bool(gr.any())
    }


def _between_layer_(model, images, layers, g, max_rounds, tol) -> dict[str, Any]:
    """§3.2: equalise the gradient ratios r_k by rescaling, biases corrected for the input scale."""
    rounds, converged, ratios = 0, False, {}
    for rnd in range(max_rounds + 1):
        in_scale: dict[str, float] = {}
        ratios = _gradient_ratios(model, images, layers, g, in_scale)
        if not ratios:
            raise ValueError("datadep: no initialised layer receives a gradient from the output; "
                             "use between_layer=False")
        log_r = {n: math.log(r) for n, r in ratios.items()}
        target = sum(log_r.values()) / len(log_r)
        if all(abs(v - target) < tol * max(1.0, abs(target)) for v in log_r.values()):
            converged = True
            break
        if rnd == max_rounds:
            break
        alpha = {n: math.exp(0.5 * (v - target)) for n, v in log_r.items()}
        done: set[str] = set()
        _forward(model, images, layers, lambda n, s=in_scale, a=alpha, d=done: _rescale(n, s, a, d))
        rounds += 1
    return {"rounds": rounds, "converged": converged, "ratios": ratios}


def datadep_(
    model: nn.Module,
    images: torch.Tensor,
    *,
    variant: str = "kmeans",
    beta: float = 0.1,
    between_layer: bool = True,
    max_rounds: int = 10,
    tol: float = 0.01,
    max_samples: int = 20_000,
    exclude: Iterable[str] = (),
    generator: int | torch.Generator | None = None,
) -> dict[str, Any]:
    """Krähenbühl et al.'s data-dependent init of every Conv2d and Linear layer of ``model``.

    .. math::
        W_{i\\cdot} \\leftarrow W_{i\\cdot}/\\sigma_i,\\ b_i \\leftarrow \\beta - \\mu_i/\\sigma_i;
        \\qquad W_k \\leftarrow \\sqrt{r_k/\\bar r}\\, W_k,\\
        r_k = \\sqrt{\\overline{\\nabla W_k^2} / \\overline{W_k^2}}

    Args:
        model: the network (modes and BatchNorm buffers restored afterwards).
        images: one batch as the network sees it (standardised), on the model's device.
        variant: ``"kmeans"`` (the paper's best), ``"pca"`` or ``"gaussian"``.
        beta: the pre-activation mean β of every unit (0.1).
        between_layer: run the between-layer scaling after the within-layer step.
        max_rounds: at most this many between-layer rescalings (10).
        tol: between-layer stopping tolerance on ``log r_k`` (0.01).
        max_samples: at most this many input rows per layer for PCA / k-means.
        exclude: names of modules left untouched (a name covers its submodules).
        generator: ``None``, an ``int`` seed or a ``torch.Generator`` on the model's device.

    Returns:
        ``{"variant", "order", "weights": {name: what was used}, "no_bias", "skipped",
        "between_layer": {"rounds", "converged", "ratios"} or None}``.

    Examples:
        >>> report = datadep_(model, images, variant="kmeans", generator=0)
        >>> report["order"]
        ['conv1', 'conv2', 'fc1', 'fc2']
    """
    _check_options(variant, max_rounds, tol, max_samples)
    layers, images, g = layerwise_setup(model, images, generator, types=_LAYERS, exclude=exclude,
                                        method="datadep")
    layer_ids = {id(m) for _, m in layers}
    skipped = [n for n, m in select_layers(model, AFFINE, exclude) if id(m) not in layer_ids]
    weights: dict[str, str] = {}

    def init_layer(name, module, args, output):
        weights[name] = _init_weight_(module, args[0], variant, max_samples, g)
        return _standardise_(module, args[0], beta)

    with layerwise_scope(model):
        order = visit_in_execution_order(model, layers, init_layer, images, "datadep")
        between = (_between_layer_(model, images, _in_order(layers, order), g, max_rounds, tol)
                   if between_layer else None)
    return {"variant": variant, "order": order, "weights": weights,
            "no_bias": [n for n, m in layers if m.bias is None], "skipped": skipped,
            "between_layer": between}


def _in_order(layers: list[tuple[str, nn.Module]], order: list[str]) -> list[tuple[str, nn.Module]]:
    by_name = dict(layers)
    return [(n, by_name[n]) for n in order]


def _check_options(variant: str, max_rounds: int, tol: float, max_samples: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_int("max_rounds", max_rounds, 0)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    check_int("max_samples", max_samples, 2)


@register("datadep", options_of=datadep_)
def datadep(model: nn.Module, *, data=None, generator=None, **options) -> dict[str, Any]:
    """Krähenbühl et al. (:func:`datadep_`) on ``data``; options are ``datadep_``'s keywords."""
    images = require_images(data, "datadep", model_device(model))
    return datadep_(model, images, generator=generator, **options)


def _fixed(variant: str):
    def fn(model: nn.Module, *, data=None, generator=None, **options) -> dict[str, Any]:
        if "variant" in options:
            raise TypeError(f"datadep_{variant} fixes variant={variant!r}; use 'datadep' to choose")
        return datadep(model, data=data, generator=generator, variant=variant, **options)

    fn.__name__ = fn.__qualname__ = f"datadep_{variant}"
    fn.__doc__ = f"``datadep`` with ``variant={variant!r}``."
    return fn


for _v in VARIANTS:
    register(f"datadep_{_v}", options_of=datadep_, fixed=("variant",))(_fixed(_v))
