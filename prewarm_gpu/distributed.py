"""Pre-Warm under data parallelism: every rank ends with the same conditioned filters.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026) conditions the first conv on *one* batch. Under ``DistributedDataParallel`` each rank holds
its own batch, and DDP broadcasts parameters only when it is constructed: a plain
:func:`~prewarm_gpu.prewarm_` after wrapping leaves every rank training a different conv1.
:func:`prewarm_distributed_` makes the ranks agree, and says how in its report.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .layers import conv_label, find_conv
from .prewarm import PrewarmReport, prewarm_

__all__ = ["prewarm_distributed_", "DistributedPrewarmReport", "DistributedPrewarmError",
           "unwrap", "wrapper_chain", "check_not_sharded"]

SYNC_MODES = ("broadcast", "compute")


@dataclass
class DistributedPrewarmReport(PrewarmReport):
    """A :class:`~prewarm_gpu.PrewarmReport` and how the ranks were made to agree.

    With ``sync="broadcast"`` every rank holds the ``src`` rank's report (its ``seconds`` too).
    """

    sync: str  # "broadcast" (src computed, the filters were broadcast), "compute" (every rank
    #            computed the same filters, checked) or "local" (torch.distributed not in use)
    src: int | None  # global rank that computed the filters (broadcast), else None
    world_size: int  # ranks in the process group (1 when local)


class DistributedPrewarmError(RuntimeError):
    """Raised on every rank but the failing one when Pre-Warm failed on another rank (that rank
    raises its own exception), so that no rank waits forever for a broadcast that never comes."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: strips ``DistributedDataParallel`` /
    ``DataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, any nesting.

    Both wrappers share their inner module's parameters, so a write to the inner conv is a write
    to the wrapped model; layer names (``layer=``, the report's ``layer``) are the inner module's.
    """
    return wrapper_chain(model)[-1]


def wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``[model, its inner module, ...]`` down to the first module that is no such wrapper."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    chain = [model]
    while True:
        m = chain[-1]
        if isinstance(m, (DistributedDataParallel, DataParallel)):
            chain.append(m.module)
        elif isinstance(m._modules.get("_orig_mod"), nn.Module):  # torch.compile's wrapper
            chain.append(m._modules["_orig_mod"])
        else:
            return chain


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def check_not_sharded(model: nn.Module, conv: nn.Conv2d, name: str) -> None:
    """Refuse sharded weights (FSDP2 ``fully_shard`` / tensor parallel ``DTensor``, FSDP1's flat
    parameters): each rank holds a slice, so Pre-Warm's in-place write of whole filters cannot
    work. Call it before sharding: the sharding then distributes the conditioned filters."""
    dtensor = _dtensor_type()
    how = ("call prewarm_ / prewarm_distributed_ before sharding the model (fully_shard, "
           "FSDP, parallelize_module); the sharding then distributes the conditioned filters")
    label = conv_label(name)
    if dtensor is not None and isinstance(conv.weight, dtensor):
        raise ValueError(f"{label}'s weight is a sharded DTensor (FSDP2 or tensor parallel); "
                         + how)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError("the model is wrapped in FullyShardedDataParallel, whose parameters "
                         "are flattened and sharded; " + how)


def _group(process_group):
    """The process group to sync over, or None when torch.distributed is not in use."""
    import torch.distributed as dist

    if process_group is None:
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first")
    return process_group


def _digest(t: torch.Tensor) -> str:
    """Exact fingerprint of a tensor's bytes (its dtype and shape included)."""
    a = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{a.dtype}{tuple(a.shape)}".encode())
    h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _local_step(model, images, sync, is_src, options, state):
    """What one rank does before the ranks talk: find and check the target, and compute when it
    is this rank's turn. Returns the entry for the others; ``state`` gets the conv and, before
    any write, a snapshot of its weight."""
    inner = unwrap(model)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D (B, C, H, W) tensor on every rank, got {shape}")
    name, conv = find_conv(inner, images.shape[1], options.get("layer"))
    check_not_sharded(inner, conv, name)
    entry = {"layer": name, "shape": tuple(conv.weight.shape), "report": None, "digest": None}
    state["conv"] = conv
    if sync == "compute" or is_src:
        state["snapshot"] = conv.weight.detach().clone()  # to undo the write if a rank fails
        report = prewarm_(inner, images, **options)
        entry["report"] = report
        entry["digest"] = _digest(conv.weight[: report.n_clusters])
    return entry


def _agreement_error(entries, ranks, sync) -> str | None:
    """Why the ranks' entries are inconsistent (different targets, or different filters with
    ``sync="compute"``), or None."""
    targets = {(e["layer"], e["shape"]) for e in entries}
    if len(targets) > 1:
        per = ", ".join(f"rank {r}: {e['layer']!r} {e['shape']}"
                        for r, e in zip(ranks, entries, strict=True))
        return f"the ranks' target convs differ ({per}); every rank needs the same model"
    if sync == "compute" and len({e["digest"] for e in entries}) > 1:
        return ("sync='compute' gave different filters on different ranks: the batches, the "
                "generator seeds or the arithmetic (non-deterministic GPU kernels) differ; pass "
                "the same batch and an int seed on every rank, or use sync='broadcast'")
    return None


@dataclass(frozen=True)
class SyncOptions:
    """How the ranks agree: :func:`prewarm_distributed_`'s keywords beside ``prewarm_``'s, checked
    once here (:func:`~prewarm_gpu.prewarm_on_first_batch` takes and passes on the same)."""

    process_group: Any = None  # the group to sync over (None: the world group, if initialised)
    src: int = 0  # global rank that computes, with sync="broadcast"
    sync: str = "broadcast"  # one of SYNC_MODES

    def __post_init__(self) -> None:
        if self.sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {self.sync!r}")


def prewarm_distributed_(
    model: nn.Module,
    images: torch.Tensor,
    *,
    process_group: Any = None,
    src: int = 0,
    sync: str = "broadcast",
    **options: Any,
) -> DistributedPrewarmReport:
    """Pre-Warm the first conv of a data-parallel model so that every rank gets the same filters.

    `Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` -
    Martinsn (2026), with collectives around :func:`~prewarm_gpu.prewarm_`; without
    ``torch.distributed`` it is exactly ``prewarm_`` (report ``sync="local"``).
    ``sync="broadcast"``: rank ``src`` computes on its batch and broadcasts the written filters
    ``weight[:n_clusters]`` only. ``sync="compute"``: every rank computes on the same batch and
    seed, and the filters are checked equal (SHA-256). A failure on any rank restores the weights
    and raises on every rank (:class:`DistributedPrewarmError` on the others). DDP, compiled and
    sharded models: docs/library.md, "Data parallelism".

    Args:
        model: the model, plain or wrapped (DDP, DataParallel, ``torch.compile``).
        images: this rank's batch, on the model's device; every rank passes one.
        process_group: the group to sync over (default: the world group when
            ``torch.distributed`` is initialised).
        src: global rank that computes, with ``sync="broadcast"``.
        sync: ``"broadcast"`` or ``"compute"``.
        **options: :func:`~prewarm_gpu.prewarm_`'s keywords.

    Returns:
        A :class:`DistributedPrewarmReport`: ``prewarm_``'s report (``src``'s on every rank with
        ``sync="broadcast"``) plus ``sync``, ``src`` and ``world_size``.

    Example:
        >>> dist.init_process_group("gloo")
        >>> model = DistributedDataParallel(torchvision.models.resnet18())
        >>> report = prewarm_distributed_(model, images, raw_images=raw, generator=0)
        >>> report.sync, report.src
        ('broadcast', 0)
    """
    how = SyncOptions(process_group, src, sync)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return synced_prewarm_(model, images, how, options)


def synced_prewarm_(model: nn.Module, images: torch.Tensor, how: SyncOptions,
                    options: dict[str, Any]) -> DistributedPrewarmReport:
    """:func:`prewarm_distributed_` past its argument checks: local, or exchange and broadcast."""
    import torch.distributed as dist

    group = _group(how.process_group)
    if group is None:
        return _prewarm_local(model, images, options)
    ranks = dist.get_process_group_ranks(group)
    if how.src not in ranks:
        raise ValueError(f"src={how.src} is not a rank of the process group (ranks {ranks})")
    state: dict[str, Any] = {}
    entry, gathered = _exchange(model, images, how, options, group, ranks, state)
    if how.sync == "compute":
        return _extend(entry["report"], "compute", None, len(ranks))
    report = gathered[ranks.index(how.src)]["report"]
    _broadcast_filters(state["conv"], report.n_clusters, how.src, group)
    return _extend(report, "broadcast", how.src, len(ranks))


def _prewarm_local(model, images, options) -> DistributedPrewarmReport:
    """No ``torch.distributed``: ``prewarm_`` on the inner module, sharded weights refused."""
    inner = unwrap(model)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        name, conv = find_conv(inner, images.shape[1], options.get("layer"))
        check_not_sharded(inner, conv, name)
    return _extend(prewarm_(inner, images, **options), "local", None, 1)


def _exchange(model, images, how, options, group, ranks, state):
    """This rank's :func:`_local_step`, then one ``all_gather_object`` of every rank's entry, so
    that a failure anywhere raises everywhere (:func:`_raise_on_failure`) before any broadcast.
    Returns this rank's entry and the gathered ones, in ``ranks`` order."""
    import torch.distributed as dist

    try:
        entry = _local_step(model, images, how.sync, dist.get_rank() == how.src, options, state)
        error = None
    except Exception as e:  # reported to every rank below, then re-raised here
        entry, error = {"error": f"{type(e).__name__}: {e}"}, e
    gathered: list[Any] = [None] * len(ranks)
    dist.all_gather_object(gathered, entry, group=group)
    _raise_on_failure(gathered, ranks, how.sync, error, state)
    return entry, gathered


def _raise_on_failure(gathered, ranks, sync, error, state) -> None:
    """If a rank failed or the ranks disagree: undo this rank's write, then raise its own
    exception, or a :class:`DistributedPrewarmError` saying which rank failed or how they differ."""
    failed = [(r, e["error"]) for r, e in zip(ranks, gathered, strict=True) if "error" in e]
    why = None if failed else _agreement_error(gathered, ranks, sync)
    if not (failed or why):
        return
    if "snapshot" in state:
        with torch.no_grad():
            state["conv"].weight.copy_(state["snapshot"])
    if error is not None:
        raise error
    if why:
        raise DistributedPrewarmError(why)
    r, msg = failed[0]
    raise DistributedPrewarmError(f"Pre-Warm failed on rank {r}: {msg}")


def _broadcast_filters(conv: nn.Conv2d, k: int, src: int, group) -> None:
    """Rank ``src``'s filters ``weight[:k]`` onto every rank's conv."""
    import torch.distributed as dist

    with torch.no_grad():
        # The conditioned filters only, as one contiguous buffer: the rest of every rank's
        # weights is its own business (DDP broadcast it at construction, or the user did).
        buf = conv.weight[:k].detach().clone()
        dist.broadcast(buf, src=src, group=group)
        if dist.get_rank() != src:
            conv.weight[:k].copy_(buf)


def _extend(report: PrewarmReport, sync: str, src: int | None,
            world_size: int) -> DistributedPrewarmReport:
    base = {f.name: getattr(report, f.name) for f in fields(PrewarmReport)}
    return DistributedPrewarmReport(**base, sync=sync, src=src, world_size=world_size)
