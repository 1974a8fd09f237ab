"""One training run of the paper's protocol (§3.3): Adam, batch 256, cross-entropy, cosine LR.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). :func:`train` is :func:`prewarm_gpu.batched.train_batched`, the one step loop, with one
run; :func:`evaluate` a model's test accuracy. The protocol (:class:`TrainConfig`, the schedule,
the curve points) lives in :mod:`prewarm_gpu.protocol` and is re-exported here.
The data order comes from the seed's generator on the data's device; the loop keeps per-step
losses on the device and reads them back only at curve points (every N/100 steps), so a GPU run
syncs ≈ 100 times, not N times. A NaN/Inf loss ends the run as ``failed`` at that step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .batched import train_batched
from .checkpoint import Checkpointer
from .data import ImageData
from .protocol import TrainConfig, TrainResult, cosine_lr, curve_steps, steps_to_target

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "cosine_lr", "curve_steps",
           "steps_to_target"]


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
    return train_batched([model], data, config, seeds=[seed], precision=precision,
                         backend="loop", channels_last=channels_last, checkpoint=checkpoint,
                         progress=progress, graphs=graphs, compile=compile)[0]
