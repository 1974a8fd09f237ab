"""One arm of a pair, built: the seed's base weights, then the run's initialisation.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), §3.3: both arms of a pair start from the same weights and see the same first batch; they
differ only by the initialiser, which gets the seed as its ``generator=`` and nothing else random.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import registry
from ..data import ImageData, first_batch_indices
from ..models import build_model, reinit_
from .plan import RunSpec, rule_text


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """The global CPU RNG seeded with ``seed`` inside, restored on exit: model constructors draw
    their default weights from it, and nothing leaks either way.

    Only the CPU generator is seeded: ``torch.manual_seed`` would also reseed every CUDA device's
    generator, which ``fork_rng(devices=[])`` does not restore."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _global_rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def init_with_generator(fn, model: nn.Module, batch: dict[str, torch.Tensor], seed: int,
                        options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``fn(model, data=batch, generator=seed, **options)``, refusing an initialiser that draws
    from the global RNG instead (a ``RuntimeError``: its result would depend on whatever ran
    before it, and a pair would no longer differ only by the initialisation)."""
    before = _global_rng_states(device)
    report = fn(model, data=batch, generator=seed, **options)
    after = _global_rng_states(device)
    if any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        name = getattr(fn, "__name__", repr(fn))
        raise RuntimeError(f"initialiser {name!r} drew from the global random number generator; "
                           "it must draw only from its generator= (results would not be "
                           "reproducible)")
    return report or {}


def build_arm(spec: RunSpec, data: ImageData) -> tuple[nn.Module, dict[str, Any]]:
    """Build the seed's model and apply the run's initialisation: ``(model, init report)``.

    The weights are drawn on the CPU from the CPU generator seeded with the seed (forked RNG,
    :func:`seeded_cpu_rng`), whatever the device, then re-drawn as ``spec.baseline``
    (:func:`prewarm_gpu.models.reinit_`, a CPU generator seeded with the seed) when that is not
    PyTorch's default. Pre-Warm and other data-dependent methods see the seed's first training
    batch (standardised, plus the raw [0, 1] pixels), with ``generator=seed`` as their only
    random source.
    """
    s = data.spec
    with seeded_cpu_rng(spec.seed):
        model = build_model(spec.arch, in_channels=s.in_channels, n_classes=s.n_classes,
                            image_size=s.image_size)
    reinit_(model, spec.baseline, generator=torch.Generator().manual_seed(spec.seed))
    model = model.to(data.device)
    idx = first_batch_indices(data.train_x.shape[0], spec.train.batch_size, spec.seed, data.device)
    batch = {"images": data.standardise(data.train_x[idx]), "raw": data.raw(data.train_x[idx])}
    report = init_with_generator(registry.get(spec.init), model, batch, spec.seed,
                                 dict(spec.options), data.device)
    return model, with_rule_source(report, spec)


def with_rule_source(report: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """The init report, plus where a Pre-Warm arm's n_patches came from (``spec.rule``):
    ``rule_source`` ("dataset" or "batch"), ``n_patches_from`` (the caption's words) and, for the
    dataset rule, its statistic (``dataset_rule``)."""
    if spec.rule is None:
        return report
    extra: dict[str, Any] = {"rule_source": spec.rule["source"],
                             "n_patches_from": rule_text(spec.rule)}
    if spec.rule["source"] == "dataset":
        extra["dataset_rule"] = dict(spec.rule)
    return {**report, **extra}
