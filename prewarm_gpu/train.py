"""The trainer's public API: training runs of the paper's protocol (§3.3), one or many at once.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). Adam, batch 256, cross-entropy, a cosine schedule. :func:`train` trains one run,
:func:`train_batched` many together (one step loop for both), :func:`evaluate` gives a model's
test accuracy. The implementation lives in :mod:`prewarm_gpu.training`; this module only names
what a user imports.

The data order comes from the seed's generator on the data's device; the loop keeps per-step
losses on the device and reads them back only at curve points (every N/100 steps), so a GPU run
syncs ≈ 100 times, not N times. A NaN/Inf loss ends the run as ``failed`` at that step.
"""

from __future__ import annotations

from .precision import PRECISIONS
from .training.backends import BACKENDS, MEASURED, choose_backend, load_measured
from .training.evaluate import evaluate
from .training.loop import train, train_batched
from .training.protocol import TrainConfig, TrainResult, cosine_lr, curve_steps, steps_to_target

__all__ = ["TrainConfig", "TrainResult", "train", "train_batched", "evaluate", "cosine_lr",
           "curve_steps", "steps_to_target", "choose_backend", "load_measured", "BACKENDS",
           "MEASURED", "PRECISIONS"]
