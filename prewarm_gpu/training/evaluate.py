"""Test accuracy: one counting loop for a single model and for a stack of runs.

Both read the test split in batches, standardise each batch as in training, and count the
argmax hits per run on the device; the host reads the R accuracies once at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..data import ImageData

__all__ = ["evaluate", "accuracies"]


@torch.no_grad()
def accuracies(logits_of: Callable[[torch.Tensor], torch.Tensor], data: ImageData,
               batch_size: int, autocast: Callable[[], object] = contextlib.nullcontext,
               ) -> list[float]:
    """Test accuracy of each of R runs; ``logits_of`` maps standardised test images (M, C, H, W)
    to logits (R, M, classes), called inside ``autocast()``."""
    correct = None
    for i in range(0, data.test_x.shape[0], batch_size):
        x = data.standardise(data.test_x[i : i + batch_size])
        with autocast():
            logits = logits_of(x)  # (R, M, classes)
        hits = (logits.argmax(-1) == data.test_y[i : i + batch_size]).sum(1)
        correct = hits if correct is None else correct + hits
    return (correct.double() / data.test_x.shape[0]).tolist()


def evaluate(model: nn.Module, data: ImageData, batch_size: int = 2048) -> float:
    """Test accuracy of ``model`` (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    try:
        return accuracies(lambda x: model(x)[None], data, batch_size)[0]
    finally:
        model.train(was_training)
