"""Clustered filters of trained models (single-filter clustering), saved as a reusable bank.

`Learning an Informed CNN Initialization for Image Classification` - Ulm, Bayer, Diaz-Bone & Jüni
(code: ``janulm/deep-learning-advanced-initialization``). For each conv layer, every 2-D kernel
``w[o, c]`` (k_h × k_w) of every trained model is one sample; :class:`prewarm_gpu.MiniBatchKMeans`
clusters them into centres ``μ_j`` with sizes ``n_j``. A new model's every (out, in) slice is a
centre drawn from the cluster-size pdf, copied as is:

.. math::
    w[o, c] = \\mu_{J_{o,c}}, \\qquad P(J = j) = n_j / \\textstyle\\sum_i n_i .

Variants (``variant=``):

- ``"euclidean"``: k-means on the raw kernels.
- ``"fourier"``, as their code does it (the report says "magnitude" but the code clusters
  ``real(fft2(w))``): features ``Re F(w)``, centres mapped back with ``real(ifft2(·))``. Since
  ``Re F(w)`` is the transform of the even part ``(w[n] + w[-n mod N]) / 2``, every fourier
  centre is **point-symmetric**, ``μ[n] = μ[-n mod N]`` (circularly, per axis): the odd (edge-like)
  part of the trained filters is lost. By Parseval this is k-means on the even parts.

The bank (:func:`build_bank`, :func:`save_bank`, :func:`load_bank`) holds per conv layer name the
centres (k, k_h, k_w) and pdf (k,), so users need no pool of pretrained models; a layer of a new
model is filled when its name is in the bank and its kernel size matches. 1×1 convs are not banked
(Ulm et al. exclude the 1×1 downsample convs). The trained filters' magnitude is kept unless
``match_he=True`` rescales each filled layer to the He std ``sqrt(2 / fan_in)``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._random import as_generator
from ..checks import check_int
from ..kmeans import MiniBatchKMeans
from ..registry import register

__all__ = ["build_bank", "pool_kernels", "save_bank", "load_bank",
           "filterbank_", "conv_kernels", "filterbank", "VARIANTS"]

VARIANTS = ("euclidean", "fourier")
FORMAT = "prewarm_gpu.filterbank/1"

Source = Mapping[str, torch.Tensor] | str | os.PathLike


def _torch_load(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; a file torch cannot read (garbage, empty,
    truncated, a pickle of code) is a one-line ``ValueError`` naming it. A missing or unreadable
    file stays an ``OSError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 — UnpicklingError, EOFError, RuntimeError, …: bad file
        first = (str(e).strip().splitlines() or [""])[0]
        cause = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise ValueError(f"{path} is not {what} (torch.load: {cause})") from e


def _load_state_dict(source: Source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, (str, os.PathLike)):
        obj = _torch_load(source, "a state dict written by torch.save")
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
        return obj
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    raise TypeError(f"a source must be a state dict or a path, got {type(source).__name__}")


def conv_kernels(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{conv name: its 2-D kernels (out·in, k_h, k_w)}, every 4-D ``*.weight`` with k_h·k_w > 1."""
    out = {}
    for key, w in state_dict.items():
        if key.endswith(".weight") and isinstance(w, torch.Tensor) and w.ndim == 4:
            if w.is_floating_point() and w.shape[2] * w.shape[3] > 1:
                out[key[: -len(".weight")]] = w.detach().reshape(-1, *w.shape[2:])
    return out


def _features(kernels: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == "fourier":
        kernels = torch.fft.fft2(kernels.double()).real
    return kernels.reshape(kernels.shape[0], -1)


def _centres(features: torch.Tensor, kernel_size: tuple[int, int], variant: str) -> torch.Tensor:
    c = features.reshape(-1, *kernel_size)
    if variant == "fourier":
        c = torch.fft.ifft2(c.double()).real
    return c


def build_bank(
    sources: Iterable[Source],
    *,
    n_clusters: int = 3,
    variant: str = "euclidean",
    layers: Iterable[str] | None = None,
    generator: int | torch.Generator | None = None,
) -> dict[str, Any]:
    """Cluster the 2-D kernels of each conv layer over trained models (Ulm et al.).

    .. math::
        \\{\\mu_j, n_j\\} = \\text{k-means}\\big(\\{\\phi(w^{(m)}[o, c])\\}_{m, o, c}\\big),\\quad
        \\phi = \\text{id (euclidean)}\\ \\text{or}\\ \\operatorname{Re}\\,\\mathrm{fft2}
        \\ \\text{(fourier)}

    Args:
        sources: trained models' state dicts, or paths of ``torch.save``d state dicts (a dict
            with a ``"state_dict"`` entry also works).
        n_clusters: k per layer (their best: 3).
        variant: ``"euclidean"`` or ``"fourier"`` (see the module docstring).
        layers: conv names to bank (default: every conv with k_h·k_w > 1).
        generator: ``None``, an ``int`` seed or a CPU ``torch.Generator`` (clusters on the CPU).

    Returns:
        ``{"format", "variant", "n_clusters", "n_models", "layers": {name: {"centres" (k, k_h,
        k_w), "pdf" (k,), "n_kernels"}}}``: plain tensors and numbers (see :func:`save_bank`).

    Examples:
        >>> bank = build_bank([m1.state_dict(), m2.state_dict()], n_clusters=3, generator=0)
        >>> bank["layers"]["conv1"]["centres"].shape
        torch.Size([3, 3, 3])
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    sources = list(sources)
    pooled = pool_kernels(sources, n_clusters=n_clusters, layers=layers)
    g = as_generator(generator, torch.device("cpu"))
    out = {}
    for name, ks in pooled.items():
        kernels = torch.cat([k.to("cpu", torch.float64) for k in ks])
        ksize = tuple(kernels.shape[1:])
        km = MiniBatchKMeans(n_clusters, random_state=g).fit(_features(kernels, variant).float())
        counts = torch.bincount(km.labels_, minlength=n_clusters).double()
        out[name] = {
            "centres": _centres(km.cluster_centers_, ksize, variant).float().contiguous(),
            "pdf": (counts / counts.sum()).float(),
            "n_kernels": int(kernels.shape[0]),
        }
    return {"format": FORMAT, "variant": variant, "n_clusters": n_clusters,
            "n_models": len(sources), "layers": out}


def pool_kernels(sources: Iterable[Source], *, n_clusters: int = 3,
                 layers: Iterable[str] | None = None) -> dict[str, list[torch.Tensor]]:
    """Every check :func:`build_bank` makes before clustering, and what it clusters: per conv
    layer, each model's 2-D kernels. Cheap (no k-means), so a command can refuse bad models or
    too many clusters before any work.

    Raises:
        ValueError: no models, a file that is not a state dict, a model with no conv, unknown
            ``layers``, kernel sizes that differ across models, fewer kernels than
            ``n_clusters``.
    """
    check_int("n_clusters", n_clusters, 1)
    sources = list(sources)
    dicts = [_load_state_dict(s) for s in sources]
    if not dicts:
        raise ValueError("build_bank needs at least one trained model's state dict")
    pooled: dict[str, list[torch.Tensor]] = {}
    for i, sd in enumerate(dicts):
        kernels = conv_kernels(sd)
        if not kernels:  # a stray file among the models must not be counted as one
            where = sources[i] if isinstance(sources[i], (str, os.PathLike)) else f"source {i}"
            raise ValueError(f"{where} has no conv layer with a kernel larger than 1×1 (no 4-D "
                             f"'*.weight'): not a trained model's state dict")
        for name, k in kernels.items():
            pooled.setdefault(name, []).append(k)
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        missing = sorted(set(layers) - set(pooled))
        if missing:
            raise ValueError(f"layers {missing} are not convs (k > 1) of the given models; "
                             f"found {sorted(pooled)}")
        if not layers:
            raise ValueError(f"layers selects no conv; the given models have {sorted(pooled)}")
        pooled = {n: pooled[n] for n in layers}
    for name, ks in pooled.items():
        sizes = {tuple(k.shape[1:]) for k in ks}
        if len(sizes) > 1:
            raise ValueError(f"layer {name!r} has different kernel sizes across models: {sizes}")
        n = sum(k.shape[0] for k in ks)
        if n < n_clusters:
            raise ValueError(f"layer {name!r}: n_samples={n} kernels should be >= "
                             f"n_clusters={n_clusters}.")
    return pooled


def save_bank(bank: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a bank with ``torch.save`` (plain tensors, numbers and strings only), atomically: a
    ``.part`` file renamed over ``path``, so a failed write leaves no torn bank.

    Raises:
        OSError: ``path`` cannot be written (torch's own "open file failed" included).
    """
    _check_bank(bank)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(bank), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports an unopenable file as RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(f"could not write the bank {path}: {e}") from e


def load_bank(path: str | os.PathLike) -> dict[str, Any]:
    """Read a bank written by :func:`save_bank` (``weights_only=True``: no code is unpickled).

    Raises:
        OSError: the file is missing or unreadable.
        ValueError: it is not a bank (garbage, empty, another torch file), naming it.
    """
    bank = _torch_load(path, "a filter bank")
    _check_bank(bank, str(path))
    return bank


def _check_bank(bank: Any, where: str = "bank") -> None:
    if not isinstance(bank, Mapping) or bank.get("format") != FORMAT:
        raise ValueError(f"{where} is not a filter bank (expected format {FORMAT!r}); "
                         "build one with build_bank / `prewarm-gpu filterbank build`")
    if not isinstance(bank.get("layers"), Mapping) or not bank["layers"]:
        raise ValueError(f"{where}: the filter bank is empty (no layers)")
    for name, e in bank["layers"].items():
        c, p = (e.get("centres"), e.get("pdf")) if isinstance(e, Mapping) else (None, None)
        if not (isinstance(c, torch.Tensor) and c.ndim == 3 and isinstance(p, torch.Tensor)
                and p.shape == (c.shape[0],) and bool((p >= 0).all()) and float(p.sum()) > 0):
            raise ValueError(f"{where}: layer {name!r} needs centres (k, k_h, k_w) and pdf (k,)")


def filterbank_(
    model: nn.Module,
    bank: Mapping[str, Any] | str | os.PathLike,
    *,
    match_he: bool = False,
    layers: Iterable[str] | None = None,
    generator: int | torch.Generator | None = None,
) -> dict[str, Any]:
    """Fill every (out, in) slice of each matching Conv2d with a bank centre drawn by cluster size.

    .. math::
        w[o, c] = \\mu_J,\\quad J \\sim \\text{Categorical}(n_1/n, \\dots, n_k/n)
        \\quad (\\text{then}\\
        w \\leftarrow w \\cdot \\sqrt{2/\\text{fan\\_in}}/\\operatorname{std}(w)
        \\ \\text{if match\\_he})

    Args:
        model: the network; a Conv2d matches when its name is in the bank and its kernel size is
            the bank's. Biases and every other layer are left as they are.
        bank: a bank (:func:`build_bank`) or the path of a saved one.
        match_he: rescale each filled layer to the He std ``sqrt(2 / fan_in)`` (one factor).
        layers: fill only these conv names (default: every match).
        generator: ``None``, an ``int`` seed or a ``torch.Generator`` on the model's device.

    Returns:
        ``{"filled": [names], "unmatched": [model convs not filled], "std": {name: std}}``.
    """
    if isinstance(bank, (str, os.PathLike)):
        bank = load_bank(bank)
    _check_bank(bank)
    entries = bank["layers"]
    convs, matched = _matching_convs(model, entries, layers)
    device = next(iter(matched.values())).weight.device
    g = as_generator(generator, device)
    with torch.no_grad():
        stds = {name: _fill_(conv.weight, entries[name], match_he, device, g)
                for name, conv in matched.items()}
    return {"filled": list(matched), "unmatched": [n for n in convs if n not in matched],
            "std": stds}


def _matching_convs(model: nn.Module, entries: Mapping[str, Any], layers: Iterable[str] | None
                    ) -> tuple[dict[str, nn.Conv2d], dict[str, nn.Conv2d]]:
    """(the convs asked for, those of them the bank has an entry of the same kernel size for)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        missing = sorted(set(layers) - set(convs))
        if missing:
            raise ValueError(f"layers {missing} are not Conv2d layers of {type(model).__name__}")
        convs = {n: convs[n] for n in layers}
    matched = {n: m for n, m in convs.items()
               if n in entries and tuple(entries[n]["centres"].shape[1:]) == tuple(m.kernel_size)}
    if not matched:
        raise ValueError(
            f"no Conv2d of {type(model).__name__} matches the bank (by name and kernel size): "
            f"model convs {[(n, tuple(m.kernel_size)) for n, m in convs.items()]}, bank layers "
            f"{[(n, tuple(e['centres'].shape[1:])) for n, e in entries.items()]}"
        )
    return convs, matched


def _fill_(w: torch.Tensor, entry: Mapping[str, torch.Tensor], match_he: bool,
           device: torch.device, g: torch.Generator) -> float:
    """One conv's weight from its bank entry, drawn on ``device`` (under ``no_grad``); returns
    the weight's std."""
    centres = entry["centres"].to(device, torch.float64)
    pdf = entry["pdf"].to(device, torch.float64)
    idx = torch.multinomial(pdf, w.shape[0] * w.shape[1], replacement=True, generator=g)
    new = centres[idx].reshape(w.shape)
    if match_he:
        std = new.std(unbiased=False)
        if std > 0:
            new = new * ((2.0 / w[0].numel()) ** 0.5 / std)
    w.copy_(new)
    return float(new.std(unbiased=False))


@register("filterbank", options_of=filterbank_)
def filterbank(model: nn.Module, *, data=None, generator=None, bank=None,
               **options) -> dict[str, Any]:
    """Clustered filters (:func:`filterbank_`); needs ``bank=`` (path or bank), not data.

    Options: ``bank``, ``match_he``, ``layers``.
    """
    if bank is None:
        raise ValueError("filterbank needs bank=: a bank file from `prewarm-gpu filterbank build` "
                         "(or prewarm_gpu.methods.filterbank.build_bank)")
    return filterbank_(model, bank, generator=generator, **options)
