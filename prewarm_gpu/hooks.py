"""Pre-Warm on the first batch a model sees: a forward pre-hook, for loops one did not write.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026) needs one training batch before training starts. A trainer framework owns its loader, so
:func:`prewarm_on_first_batch` takes that batch where it passes anyway: at the model's first
forward call, before that forward runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .distributed import SyncOptions, synced_prewarm_, wrapper_chain
from .prewarm import PrewarmReport, prewarm_
from .prewarm_plan import _value_range

__all__ = ["prewarm_on_first_batch", "FirstBatchPrewarm"]

# prewarm_'s keywords other than the batch: their names are checked at install, their values
# by prewarm_ at the first forward.
PREWARM_OPTIONS = tuple(name for name, p in inspect.signature(prewarm_).parameters.items()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY)
# Rounding of x·std + mean may leave [0, 1] by this much on raw pixels; more is a wrong mean/std.
_RAW_SLACK = 1e-4


class FirstBatchPrewarm:
    """The handle :func:`prewarm_on_first_batch` returns.

    Attributes:
        report: the :class:`~prewarm_gpu.distributed.DistributedPrewarmReport` of the run (its
            ``sync`` is ``"local"`` outside ``torch.distributed``), None until the hook ran.
        error: the exception the run raised (also raised from that forward call), else None.
    """

    def __init__(self, module: nn.Module, options: dict[str, Any], select: int | str,
                 mean: torch.Tensor | None, std: torch.Tensor | None, how: SyncOptions):
        self.report: PrewarmReport | None = None
        self.error: BaseException | None = None
        self.module = module  # the inner module the hook is on
        self._options, self._select, self._mean, self._std = options, select, mean, std
        self._how = how
        # compiler.disable: a torch.compile'd model runs the hook eagerly (a graph break)
        # instead of tracing k-means' host reads into its graph.
        hook = torch.compiler.disable(self._hook)
        self._handle = module.register_forward_pre_hook(hook, with_kwargs=True)

    @property
    def pending(self) -> bool:
        """Whether the hook is still waiting for its first batch."""
        return self._handle is not None

    def remove(self) -> None:
        """Uninstall the hook (a no-op once it ran or was removed)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _batch(self, args: tuple, kwargs: dict) -> torch.Tensor:
        s = self._select
        if isinstance(s, str):
            if s not in kwargs:
                raise ValueError(f"the first forward call has no keyword argument {s!r} "
                                 f"(input={s!r}); its keywords: {sorted(kwargs)}")
            x = kwargs[s]
        else:
            if s >= len(args):
                raise ValueError(f"the first forward call has {len(args)} positional arguments, "
                                 f"no argument {s} (input={s}); pass input= to choose the images")
            x = args[s]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the first forward call's input {s!r} is a {type(x).__name__}, not "
                            "an image tensor; pass input= (an index or a keyword) to choose it")
        return x

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """raw = x·std + mean per channel, clipped to [0, 1] when only rounding left it."""
        C = x.shape[1] if x.ndim == 4 else None
        if C != self._mean.numel():
            raise ValueError(f"mean/std have {self._mean.numel()} channels but the first batch "
                             f"has shape {tuple(x.shape)}; expected (B, {self._mean.numel()}, H, "
                             "W)")
        if not x.is_floating_point():
            raise TypeError(f"mean/std undo a standardisation, but the first batch is {x.dtype}")
        shape = (1, C, 1, 1)
        std = self._std.to(x.device, x.dtype).view(shape)
        raw = x.detach() * std + self._mean.to(x.device, x.dtype).view(shape)
        lo, hi = _value_range(raw)
        if -_RAW_SLACK <= lo and hi <= 1 + _RAW_SLACK:
            raw.clamp_(0, 1)
        return raw  # else out of [0, 1]: prewarm_ warns that mean/std do not give raw pixels

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._handle is None:  # defensive: dynamo may skip guards on hooks, so a cached
            return None  # graph could call a removed hook (not seen with torch 2.14)
        self.remove()  # first: a failure must not make every later batch retry
        try:
            x = self._batch(args, kwargs)
            options = dict(self._options)
            if self._mean is not None:
                with torch.no_grad():
                    options["raw_images"] = self._raw(x)
            self.report = synced_prewarm_(module, x, self._how, options)
        except BaseException as e:
            self.error = e
            raise
        return None


def _channel_vector(name: str, v) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
    if t.ndim > 1 or t.numel() == 0:
        raise ValueError(f"{name} must be one number per channel, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t.reshape(-1)


def prewarm_on_first_batch(
    model: nn.Module,
    *,
    input: int | str = 0,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    process_group: Any = None,
    src: int = 0,
    sync: str = "broadcast",
    **options: Any,
) -> FirstBatchPrewarm:
    """Run Pre-Warm on the first batch ``model`` is called with, before that forward, once.

    `Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` -
    Martinsn (2026). A forward pre-hook calls :func:`~prewarm_gpu.prewarm_distributed_` on the
    call's images and removes itself; a failure propagates from that forward, the model as it was.
    The rules (Table 2) need raw [0, 1] pixels: for standardised inputs give ``raw_images=``,
    ``mean=``/``std=`` (raw = x·std + mean) or ``n_patches``. DDP, ``torch.compile`` and
    ``torch.distributed``: docs/library.md, "Data parallelism" (``nn.DataParallel`` is refused).

    Args:
        model: the model (plain, DDP or compiled).
        input: which argument of the forward call holds the images: a position or a keyword.
        mean, std: per-channel standardisation to undo for the rules; both or neither.
        process_group, src, sync, **options: as :func:`~prewarm_gpu.prewarm_distributed_`
            (every rank installs the hook); the option names are checked here, at install,
            their values at the first forward.

    Returns:
        A :class:`FirstBatchPrewarm`: ``.report`` (None until the first forward), ``.pending``,
        ``.remove()``.

    Example:
        >>> handle = prewarm_on_first_batch(model, mean=(0.5,) * 3, std=(0.25,) * 3, generator=0)
        >>> for x, y in loader: ...  # the first model(x) conditions conv1, then trains on
        >>> handle.report.n_patches
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    unknown = sorted(set(options) - set(PREWARM_OPTIONS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; prewarm_on_first_batch takes input, mean, "
                        f"std, process_group, src, sync and prewarm_'s {list(PREWARM_OPTIONS)}")
    how = SyncOptions(process_group, src, sync)
    if isinstance(input, bool) or not isinstance(input, (int, str)) or (
            isinstance(input, int) and input < 0):
        raise TypeError(f"input must be an argument index >= 0 or a keyword name, got {input!r}")
    m, s = _standardisation(mean, std, options.get("raw_images"))
    return FirstBatchPrewarm(_hooked_module(model), options, input, m, s, how)


def _standardisation(mean, std, raw_images) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``mean``/``std`` as float64 channel vectors (both or neither, not with ``raw_images``)."""
    if (mean is None) != (std is None):
        raise ValueError("give mean and std together (raw = x·std + mean), or neither")
    if mean is None:
        return None, None
    if raw_images is not None:
        raise ValueError("give raw_images or mean/std, not both: both say what the raw pixels are")
    m, s = _channel_vector("mean", mean), _channel_vector("std", std)
    if m.numel() != s.numel():
        raise ValueError(f"mean has {m.numel()} channels but std has {s.numel()}")
    if not (s > 0).all():
        raise ValueError(f"std must be > 0 per channel, got {s.tolist()}")
    return m, s


def _hooked_module(model: nn.Module) -> nn.Module:
    """The inner module every wrapper calls (the hook's place); ``nn.DataParallel`` refused."""
    from torch.nn import DataParallel

    chain = wrapper_chain(model)
    if any(isinstance(w, DataParallel) for w in chain):
        raise ValueError("nn.DataParallel re-replicates the module at every forward, so a hook's "
                         "write would go to a replica; call prewarm_(model.module, images) "
                         "before training, or use DistributedDataParallel")
    return chain[-1]
