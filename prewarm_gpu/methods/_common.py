"""Shared helpers of the related methods: layer selection, input checks, measurement, rollback,
and the layer-wise pass LSUV and datadep share (:func:`layerwise_setup`, :func:`layerwise_scope`,
:func:`visit_in_execution_order`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .._random import as_generator
from ..precision import float32_scope
from ..registry import split_data

AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (a model without parameters is an error)."""
    for p in model.parameters():
        return p.device
    raise ValueError(f"{type(model).__name__} has no parameters to initialise")


def require_images(data, method: str, device: torch.device) -> torch.Tensor:
    """The standardised batch of ``data`` (a tensor or a dict) on ``device``, or a clear error."""
    images, _ = split_data(data)
    if images is None:
        raise ValueError(f"{method} needs data: a batch of training images (got data=None)")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{method}: data must be a tensor or a dict with 'images', "
                        f"got {type(images).__name__}")
    if images.numel() == 0 or images.shape[0] < 2:
        raise ValueError(
            f"{method} needs a batch of at least 2 images, got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{method}: images must be floating point, got {images.dtype}")
    return images.to(device)


def _covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_names(model: nn.Module, names: Iterable[str], what: str) -> list[str]:
    """``names`` as a list, each the name of a submodule of ``model`` (``ValueError`` otherwise)."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    known = {n for n, _ in model.named_modules()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: no module named {unknown} in {type(model).__name__}")
    return names


def select_layers(model: nn.Module, types: tuple[type, ...],
                  exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of ``types``, except those inside an ``exclude``d name.

    A module that appears under two names (shared weights) is listed once.
    """
    exclude = check_names(model, exclude, "exclude")
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, types) or id(m) in seen:
            continue
        seen.add(id(m))
        if any(_covers(e, name) for e in exclude):
            continue
        out.append((name, m))
    return out


@contextmanager
def rollback(model: nn.Module) -> Iterator[None]:
    """On an exception, copy the parameters and buffers back to what they were (in place)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(saved[k])
        raise


@contextmanager
def measurement_mode(model: nn.Module) -> Iterator[None]:
    """Training-path forward with deterministic statistics; every module's mode restored after.

    The model is put in train mode (so a forward takes its training path, e.g. runs auxiliary
    heads) with every BatchNorm and Dropout module in eval mode: BatchNorm normalises with its
    running statistics (≈ identity for a freshly built model) and updates nothing; Dropout is the
    identity. The BatchNorm buffers are saved and restored anyway.
    """
    modes = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    buffers = [(b, b.detach().clone()) for m in norms for b in m.buffers(recurse=False)]
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, (_BatchNorm, _DropoutNd)):
                m.eval()
        yield
    finally:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        for m, training in modes:
            m.training = training


def layerwise_setup(model: nn.Module, images: torch.Tensor,
                    generator: int | torch.Generator | None, *, types: tuple[type, ...],
                    exclude: Iterable[str], method: str
                    ) -> tuple[list[tuple[str, nn.Module]], torch.Tensor, torch.Generator]:
    """What a layer-wise initialiser starts from: the layers of ``types`` it visits
    (:func:`select_layers`; a model without one is refused), the batch moved to the model's
    device, and the one random source normalised there."""
    layers = select_layers(model, types, exclude)
    if not layers:
        kinds = "/".join(t.__name__ for t in types)
        raise ValueError(
            f"{method} found no {kinds} layer to initialise in {type(model).__name__}"
            + (f" (excluded: {list(exclude)})" if exclude else "")
        )
    device = model_device(model)
    return layers, images.to(device), as_generator(generator, device)


@contextmanager
def layerwise_scope(model: nn.Module) -> Iterator[None]:
    """Where a layer-wise initialiser works: no autograd, :func:`measurement_mode`, the model
    :func:`rollback`-ed on an error, and IEEE fp32 (no TF32 convolutions on CUDA: the statistics
    are measured, not approximated)."""
    with torch.no_grad(), rollback(model), measurement_mode(model), float32_scope("ieee"):
        yield


def visit_in_execution_order(model: nn.Module, layers: list[tuple[str, nn.Module]], step,
                             images: torch.Tensor, method: str) -> list[str]:
    """One forward pass on ``images`` in which ``step(name, module, args, output)`` runs inside
    each layer's forward hook, on its first call only; what ``step`` returns is the output the rest
    of the pass sees. Returns the layers' names in execution order; every layer must have run.

    Raises:
        RuntimeError: a layer did not run in the forward pass.
    """
    order: list[str] = []

    def hook_for(name: str):
        def hook(module, args, output):
            if name in order:  # a module called twice in the pass is visited once
                return None
            order.append(name)
            return step(name, module, args, output)

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    missed = [n for n, _ in layers if n not in order]
    if missed:
        raise RuntimeError(f"{method}: layers {missed} did not run in the forward pass on the "
                           "batch; exclude them or check the model's forward")
    return order
