"""The protocol of one run (§3.3, Table 1) and what a run produces: plain data, no torch ops.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). :class:`TrainConfig` (Adam, batch 256, cross-entropy, cosine schedule from η_start to
η_end over T steps, N steps run), :class:`TrainResult`, the closed-form schedule, the curve points
and "steps to target". The trainer (:mod:`prewarm_gpu.training`) and the harness import them
from here; :mod:`prewarm_gpu.train` re-exports them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..checks import is_int

__all__ = ["TrainConfig", "TrainResult", "cosine_lr", "curve_steps", "steps_to_target"]


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


def steps_to_target(loss_steps: list[int], loss: list[float | None],
                    target: float) -> int | None:
    """"Steps to target": the first curve point whose window-mean training loss is below
    ``target`` (``None``: never). The one definition, used for results and for records."""
    for step, value in zip(loss_steps, loss, strict=False):
        if value is not None and value < target:
            return step
    return None
