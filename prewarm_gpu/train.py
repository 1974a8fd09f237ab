"""One training run of the paper's protocol (§3.3): Adam, batch 256, cross-entropy, cosine LR.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). The protocol (:class:`TrainConfig`), a run's result, the schedule and the curve points;
the step loop itself is :func:`prewarm_gpu.batched.train_batched`, which trains one run or many.
The data order comes from the seed's generator on the data's device; the loop keeps per-step
losses on the device and reads them back only at curve points (every N/100 steps), so a GPU run
syncs ≈ 100 times, not N times. A NaN/Inf loss ends the run as ``failed`` at that step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpointer
from .checks import is_int
from .data import ImageData

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "cosine_lr", "curve_steps",
           "steps_to_target"]


@dataclass
class TrainConfig:
    """The protocol of one run (Table 1); every field can be overridden from the CLI."""

    steps: int = 5000  # N optimisation steps
    batch_size: int = 256
    lr_start: float = 3e-3  # η_start of the cosine schedule
    lr_end: float = 3e-5  # η_end, reached at step T (t_max; N unless set)
    eval_points: int = 10  # test-accuracy checkpoints (plus step 0)
    loss_points: int = 100  # training-loss curve points; each is the mean loss of its window
    aux_weight: float = 0.3  # weight of Σ CE(aux_logits) for models that expose aux heads
    target_loss: float = 0.5  # "steps to target": first curve point with window-mean loss below
    eval_batch_size: int = 2048  # test images per forward pass
    schedule_steps: int | None = None  # T, the cosine schedule's length (None: steps); >= steps

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, "
                             f"{self.batch_size}")
        if self.schedule_steps is not None and not (
                is_int(self.schedule_steps) and self.schedule_steps >= self.steps):
            raise ValueError(f"schedule_steps (the cosine schedule's length T) must be an int >= "
                             f"steps = {self.steps} (or None: T = steps), got "
                             f"{self.schedule_steps!r}")
        if not (self.lr_start > 0 and self.lr_end >= 0):
            raise ValueError(f"learning rates must be positive, got {self.lr_start} → "
                             f"{self.lr_end}")
        if self.eval_points < 1 or self.loss_points < 1:
            raise ValueError("eval_points and loss_points must be >= 1")

    @property
    def t_max(self) -> int:
        """T of the cosine schedule: ``schedule_steps``, else ``steps`` (the run ends at η_end).
        ``steps < T`` stops early on the same schedule: ``--steps 500 --schedule-steps 5000`` is
        step 500 of the paper's 5000-step run."""
        return self.steps if self.schedule_steps is None else self.schedule_steps


@dataclass
class TrainResult:
    """What one run produced; ``accuracy`` is ``None`` when the run failed."""

    status: str  # "ok" or "failed"
    accuracy: float | None  # final test accuracy
    failed_step: int | None = None  # first step (1-based) whose loss was NaN/Inf
    error: str | None = None
    traceback: str | None = None  # of the exception that failed the run, if one did
    loss_steps: list[int] = field(default_factory=list)  # curve points (steps done)
    loss: list[float] = field(default_factory=list)  # mean training loss of each window
    acc_steps: list[int] = field(default_factory=list)  # 0 (at init) … N
    test_acc: list[float] = field(default_factory=list)
    steps_to_target: int | None = None  # None: the loss never fell below target_loss
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cosine_lr(step: int, steps: int, lr_start: float, lr_end: float) -> float:
    """Cosine annealing (Loshchilov & Hutter, 2017) at ``step`` of ``steps``:
    ``η_end + (η_start − η_end)·(1 + cos(π·step/N))/2`` — what ``CosineAnnealingLR`` computes."""
    return lr_end + (lr_start - lr_end) * (1 + math.cos(math.pi * step / steps)) / 2


def curve_steps(steps: int, points: int) -> list[int]:
    """``points`` roughly equally spaced step counts in (0, steps], always ending at ``steps``."""
    points = min(points, steps)
    return sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)})


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 2048) -> float:
    """Test accuracy of ``model`` (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.device)
    for i in range(0, data.test_x.shape[0], batch_size):
        logits = model(data.standardise(data.test_x[i : i + batch_size]))
        correct += (logits.argmax(1) == data.test_y[i : i + batch_size]).sum()
    model.train(was_training)
    return int(correct) / data.test_x.shape[0]


def steps_to_target(loss_steps: list[int], loss: list[float | None],
                    target: float) -> int | None:
    """"Steps to target": the first curve point whose window-mean training loss is below
    ``target`` (``None``: never). The one definition, used for results and for records."""
    for step, value in zip(loss_steps, loss, strict=False):
        if value is not None and value < target:
            return step
    return None


def train(model: nn.Module, data: ImageData, config: TrainConfig, *, seed: int,
          precision: str = "fp32", channels_last: bool | None = None,
          checkpoint: Checkpointer | None = None,
          progress: Callable[[int], None] | None = None, graphs: str = "auto",
          compile: bool = False) -> TrainResult:
    """Train ``model`` on ``data`` with the protocol of §3.3 and the seed's data order.

    This is :func:`prewarm_gpu.batched.train_batched` with one run on the loop backend (the run's
    own kernels), so one run and many share one step loop and one curve recorder.

    Args:
        model: on ``data.device``; trained in place.
        data: the dataset (uint8 on its device).
        config: the protocol.
        seed: seeds the data order, ``torch.Generator(device).manual_seed(seed)``; the first
            batch is :func:`prewarm_gpu.data.first_batch_indices` of the same seed.
        precision: ``"fp32"`` (IEEE), ``"tf32"`` or ``"bf16"`` (autocast); see
            :func:`prewarm_gpu.batched.train_batched`.
        channels_last: the model in NHWC (default: on the CPU).
        checkpoint: in-run checkpoints (see :class:`prewarm_gpu.checkpoint.Checkpointer`).
        progress: called with the number of steps done since its last call.
        graphs: the step as a CUDA graph (``"auto"``: on CUDA); see :mod:`prewarm_gpu.step`.
        compile: the step's forward through ``torch.compile``.

    Returns:
        :class:`TrainResult`; a NaN/Inf loss gives ``status="failed"`` with ``failed_step``.
    """
    from .batched import train_batched

    return train_batched([model], data, config, seeds=[seed], precision=precision,
                         backend="loop", channels_last=channels_last, checkpoint=checkpoint,
                         progress=progress, graphs=graphs, compile=compile)[0]
