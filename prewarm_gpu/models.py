"""The paper's network (§3.1) and a registry of architectures the harness can build.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). Every factory in :data:`MODELS` is called as
``factory(in_channels=C, n_classes=K, image_size=(H, W))`` and returns an ``nn.Module`` whose first
convolution is reachable as ``conv1``. A model may expose ``aux_logits`` (a list of tensors its
forward sets in train mode); the trainer then adds ``aux_weight · Σ CE(aux)`` to the loss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["SimpleCNN", "MODELS", "BASELINES", "register_model", "build_model", "fc_dim", "reinit_"]

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: add a model factory to :data:`MODELS` under ``name`` (warns on overwrite).

    Examples:
        >>> @register_model("my-cnn")
        ... class MyCNN(SimpleCNN): ...
    """

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            warnings.warn(f"model {name!r} is registered again; replacing it", stacklevel=2)
        MODELS[name] = factory
        return factory

    return deco


def build_model(name: str, *, in_channels: int, n_classes: int,
                image_size: int | tuple[int, int]) -> nn.Module:
    """Build the architecture registered as ``name``; a ``KeyError`` lists the known names."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
    return factory(in_channels=in_channels, n_classes=n_classes, image_size=_pair(image_size))


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def fc_dim(image_size: int | tuple[int, int], channels: int = 64, n_pools: int = 2) -> int:
    """Flattened size after ``n_pools`` 2×2 max-pools (floor): 28² → 3136, 32² → 4096, 8² → 256."""
    h, w = _pair(image_size)
    for _ in range(n_pools):
        h, w = h // 2, w // 2
    return channels * h * w


@register_model("simplecnn")
class SimpleCNN(nn.Module):
    """SimpleCNN of §3.1: two conv blocks and a two-layer classifier.

    ``Conv(C_in→32, 3×3, pad 1) → BN → ReLU → MaxPool(2) → Conv(32→64, 3×3, pad 1) → BN → ReLU →
    MaxPool(2) → Flatten → FC(→256) → ReLU → FC(→n_classes)``. Weights are PyTorch's defaults
    (Kaiming-uniform), the paper's baseline.

    Args:
        in_channels: C_in (1 grayscale, 3 colour).
        n_classes: outputs of the last layer.
        image_size: H (square) or (H, W); sets the FC input (28² → 3136, 32² → 4096, 8² → 256).

    Examples:
        >>> SimpleCNN(in_channels=1, n_classes=10, image_size=28).fc1.in_features
        3136
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10,
                 image_size: int | tuple[int, int] = 28) -> None:
        super().__init__()
        h, w = _pair(image_size)
        if in_channels < 1 or n_classes < 1:
            raise ValueError(f"in_channels and n_classes must be >= 1, got {in_channels}, "
                             f"{n_classes}")
        if h < 4 or w < 4:
            raise ValueError(f"image_size must be at least 4×4 (two 2×2 pools), got {h}×{w}")
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(fc_dim((h, w)), 256)
        self.fc2 = nn.Linear(256, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """The two conv blocks, flattened: (B, C_in, H, W) → (B, fc_dim)."""
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        return self.flatten(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(self.features(x))))


# --- the baseline's weights ----------------------------------------------------------------------

BASELINES = ("torch-default", "he-normal", "he-uniform")
"""What "Kaiming" means for the paired baseline: ``torch-default`` is the model as constructed
(PyTorch's ``kaiming_uniform_(a=√5)``: std 1/√(3·fan_in), the paper's Listing 2 "right after model
creation"); ``he-normal`` / ``he-uniform`` are He et al. (2015): std √(2/fan_in), biases zero."""


@torch.no_grad()
def reinit_(model: nn.Module, baseline: str, *, generator: torch.Generator | None = None
            ) -> nn.Module:
    """Re-initialise every conv and linear layer of ``model`` as ``baseline`` (:data:`BASELINES`).

    ``he-normal``: ``W ~ N(0, 2/fan_in)``; ``he-uniform``: ``W ~ U(±√(6/fan_in))`` (He et al.,
    2015, fan-in mode, ReLU gain); biases 0. ``torch-default`` leaves the model as built. Layers
    are visited in ``model.modules()`` order with ``generator`` (CPU), so a seed fixes the result.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if baseline == "torch-default":
        return model
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fan_in = m.weight[0].numel()
            std = math.sqrt(2.0 / fan_in)
            w = torch.empty(m.weight.shape, dtype=m.weight.dtype)
            if baseline == "he-normal":
                w.normal_(0.0, std, generator=generator)
            else:
                w.uniform_(-math.sqrt(3) * std, math.sqrt(3) * std, generator=generator)
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.zero_()
    return model
