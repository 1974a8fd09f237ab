"""The one training loop: R runs of the paper's protocol (§3.3) at once, one step for all of them.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). All runs of a group (seeds × arms) share the architecture, the optimiser and the
schedule, so they train as one stack (:mod:`prewarm_gpu.training.stacks`) on one backend
(:mod:`prewarm_gpu.training.backends`). Nothing couples the runs:

- each run draws its batches from its own seed's data order (the single-run trainer's order);
- BatchNorm statistics are per run (each run's running buffers are its own);
- the loss is the *sum* of the per-run mean losses, so each run's gradient is its own;
- Adam is elementwise, so one Adam over stacked tensors is R independent Adams (no global-norm
  clipping); the cosine schedule is one scalar shared by all runs.

The step loop never syncs with the host: losses stay on the device and are read back at the curve
points (:mod:`prewarm_gpu.training.curves`). :func:`train` is :func:`train_batched` with one run on
the loop backend; in fp32 many runs equal one run at a time to float rounding (tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..data import EpochStream, ImageData
from ..precision import PRECISIONS, float32_mode, float32_scope, forward_autocast
from .backends import make_stack
from .checkpoint import Checkpointer
from .curves import Curves
from .evaluate import accuracies
from .protocol import TrainConfig, TrainResult
from .step import GRAPHS, TrainStep, make_runner

__all__ = ["train", "train_batched"]


def train_batched(
    models: list[nn.Module],
    data: ImageData,
    config: TrainConfig,
    *,
    seeds: list[int],
    precision: str = "fp32",
    backend: str = "auto",
    channels_last: bool | None = None,
    checkpoint: Checkpointer | None = None,
    progress: Callable[[int], None] | None = None,
    graphs: str = "auto",
    compile: bool = False,
) -> list[TrainResult]:
    """Train ``models`` (one per seed in ``seeds``) together; returns one result per run.

    Each run draws batches from its own seed's data order, and its trained weights are written
    back into its model. A run whose loss turns NaN/Inf is marked failed at that step; the others
    go on (they share no arithmetic with it). The step loop does not sync with the host: it reads
    the losses at the curve points, evaluates at the accuracy points, and checkpoints when due.

    Args:
        models: initialised models of one architecture, on ``data.device``.
        data: the dataset (uint8 on its device).
        config: the protocol (shared by all runs).
        seeds: the data-order seed of each run.
        precision: ``"fp32"`` (default, as the paper: IEEE float32, TF32 off on CUDA),
            ``"tf32"`` (TF32 convolutions and matmuls on CUDA) or ``"bf16"`` (autocast around
            each forward pass). Every precision runs with cuDNN deterministic and benchmark off;
            the caller's flags are restored after (:mod:`prewarm_gpu.precision`).
        backend: ``"grouped"`` (SimpleCNN only: runs folded into grouped convolutions),
            ``"bmm"`` (SimpleCNN only: batched matrix products), ``"vmap"`` (any architecture
            without auxiliary heads), ``"loop"`` (per-run kernels in one step; any model) or
            ``"auto"``: the fastest measured (:func:`.backends.choose_backend`).
        channels_last: models in NHWC (default: on the CPU); the grouped and loop backends.
        checkpoint: where and how often to checkpoint; a usable checkpoint found there is
            continued from (bit-identical to an uninterrupted run on the CPU).
        progress: called with the number of run-steps done since its last call.
        graphs: ``"auto"`` (on CUDA), ``"on"`` or ``"off"``: the step
            (:meth:`prewarm_gpu.training.step.TrainStep.step`) captured once as a CUDA graph and
            replayed, else run eagerly; the same arithmetic either way.
        compile: the step's forward (and so its backward) through ``torch.compile``.
    """
    _check_models(models, seeds, data.device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if graphs not in GRAPHS:
        raise ValueError(f"graphs must be one of {GRAPHS}, got {graphs!r}")
    opts = _Options(precision, backend, channels_last, checkpoint, progress, graphs, compile)
    # Autocast off around everything (a caller's region would otherwise lower fp32's forward
    # and every backward matmul); bf16 turns it on for each forward pass alone.
    with float32_scope(float32_mode(precision)), torch.autocast(data.device.type, enabled=False):
        t0 = time.perf_counter()
        run = _Run(models, data, config, seeds, opts)
        run.steps(run.start())
        return run.finish(models, t0)


def train(model: nn.Module, data: ImageData, config: TrainConfig, *, seed: int,
          precision: str = "fp32", channels_last: bool | None = None,
          checkpoint: Checkpointer | None = None,
          progress: Callable[[int], None] | None = None, graphs: str = "auto",
          compile: bool = False) -> TrainResult:
    """Train ``model`` on ``data`` with the protocol of §3.3 and the seed's data order.

    This is :func:`train_batched` with one run on the loop backend (the run's own kernels), so
    one run and many share one step loop and one curve recorder.

    Args:
        model: on ``data.device``; trained in place.
        data: the dataset (uint8 on its device).
        config: the protocol.
        seed: seeds the data order, ``torch.Generator(device).manual_seed(seed)``; the first
            batch is :func:`prewarm_gpu.data.first_batch_indices` of the same seed.
        precision: ``"fp32"`` (IEEE), ``"tf32"`` or ``"bf16"`` (autocast); see
            :func:`train_batched`.
        channels_last: the model in NHWC (default: on the CPU).
        checkpoint: in-run checkpoints (see
            :class:`prewarm_gpu.training.checkpoint.Checkpointer`).
        progress: called with the number of steps done since its last call.
        graphs: the step as a CUDA graph (``"auto"``: on CUDA); see
            :mod:`prewarm_gpu.training.step`.
        compile: the step's forward through ``torch.compile``.

    Returns:
        :class:`TrainResult`; a NaN/Inf loss gives ``status="failed"`` with ``failed_step``.
    """
    return train_batched([model], data, config, seeds=[seed], precision=precision,
                         backend="loop", channels_last=channels_last, checkpoint=checkpoint,
                         progress=progress, graphs=graphs, compile=compile)[0]


def _check_models(models: list[nn.Module], seeds: list[int], device: torch.device) -> None:
    if not models:
        raise ValueError("no models to train")
    if len(models) != len(seeds):
        raise ValueError(f"{len(models)} models but {len(seeds)} seeds; one seed per run")
    shapes = [(n, tuple(p.shape)) for n, p in models[0].state_dict().items()]
    for m in models[1:]:
        if type(m) is not type(models[0]) or \
                [(n, tuple(p.shape)) for n, p in m.state_dict().items()] != shapes:
            raise ValueError("batched training needs models of one architecture")
    for m in models:
        for p in m.parameters():
            if p.device != device:
                raise ValueError(f"a model is on {p.device} but the data is on {device}")


@dataclass(frozen=True)
class _Options:
    """:func:`train_batched`'s keyword arguments, checked."""

    precision: str
    backend: str
    channels_last: bool | None
    checkpoint: Checkpointer | None
    progress: Callable[[int], None] | None
    graphs: str
    compile: bool


class _Run:
    """One call of :func:`train_batched` on valid input, inside its float32 scope: the stack, the
    step, each run's data order and the curves; :meth:`start`, :meth:`steps`, :meth:`finish`."""

    def __init__(self, models: list[nn.Module], data: ImageData, cfg: TrainConfig,
                 seeds: list[int], opts: _Options):
        dev = data.device
        self.data, self.cfg, self.opts, self.R = data, cfg, opts, len(models)
        for m in models:
            m.train()
        self.stack = make_stack(opts.backend, models, dev, opts.channels_last,
                                tuple(data.train_x.shape[-2:]))
        self.autocast = lambda: forward_autocast(opts.precision, dev)  # training and evaluation
        self.ts = TrainStep(self.stack, data, cfg, self.R, self.autocast,
                            capturable=dev.type == "cuda", compile=opts.compile)
        self.streams = [EpochStream(data.train_x.shape[0], cfg.batch_size,
                                    torch.Generator(device=dev).manual_seed(s)) for s in seeds]
        self.curves = Curves(self.R, cfg)

    def _accuracies(self) -> list[float]:
        # eval mode inside eval_logits: running statistics, no buffer updates
        return accuracies(self.stack.eval_logits, self.data, self.cfg.eval_batch_size,
                          self.autocast)

    def _progress(self, run_steps: int) -> None:
        if self.opts.progress:
            self.opts.progress(run_steps)

    def start(self) -> int:
        """The step to start from: a usable checkpoint's (its state loaded), else 0 (and the
        step-0 accuracy recorded)."""
        ckpt = self.opts.checkpoint
        resumed = ckpt.load() if ckpt is not None else None
        if resumed is None:
            self.curves.accuracy(0, self._accuracies())
            return 0
        start, state = resumed
        self.stack.load_state_dict(state["stack"])
        self.ts.load_state_dict(state, start)
        for st, sd in zip(self.streams, state["streams"], strict=True):
            st.load_state_dict(sd)
        self.ts.losses[:start] = state["losses"].to(self.data.device)
        self.curves.load_state_dict(state["curves"])
        self._progress(self.R * start)
        return start

    def steps(self, start: int) -> None:
        """Steps ``start + 1 … N``: each run's batch drawn, the step queued; the curves read at
        their marks (stopping once every run failed) and a checkpoint written when one is due."""
        ckpt, n = self.opts.checkpoint, self.cfg.steps
        marks = self.curves.marks
        run_step = make_runner(self.ts, self.opts.graphs, self.data.device)
        for t in range(start, n):
            step = t + 1
            run_step(torch.stack([next(s) for s in self.streams]))  # (R, B) indices, drawn here
            if step in marks and not self._read(step):
                break
            if ckpt is not None and step < n and ckpt.due(step):
                ckpt.save(step, self._state(step))

    def _read(self, step: int) -> bool:
        """The host read of a curve point (and the evaluation at an accuracy point); whether any
        run is still alive."""
        before = self.curves.done
        self.curves.losses(step, self.ts.losses)
        if step in self.curves.acc_marks:
            self.curves.accuracy(step, self._accuracies())
        self._progress(self.R * (step - before))
        return any(self.curves.alive)

    def _state(self, step: int) -> dict:
        """What a checkpoint after ``step`` holds."""
        return {"stack": self.stack.state_dict(), **self.ts.state_dict(),
                "streams": [st.state_dict() for st in self.streams],
                "losses": self.ts.losses[:step].cpu(), "curves": self.curves.state_dict()}

    def finish(self, models: list[nn.Module], t0: float) -> list[TrainResult]:
        """The trained weights into ``models``; the results, each with an equal share of the
        wall time since ``t0``."""
        if self.curves.done < self.cfg.steps:
            self._progress(self.R * (self.cfg.steps - self.curves.done))  # failed runs' steps
        self.stack.write_back(models)
        if self.data.device.type == "cuda":
            torch.cuda.synchronize(self.data.device)
        seconds = time.perf_counter() - t0
        for r in self.curves.results:
            r.seconds = seconds / self.R  # wall time shared equally among the runs of the batch
        return self.curves.finish()
