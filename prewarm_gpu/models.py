"""The paper's network (§3.1), its deeply supervised variant, and the baselines' weights.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). Architectures register into :data:`prewarm_gpu.registry.MODELS` (re-exported here);
every factory is called as
``factory(in_channels=C, n_classes=K, image_size=(H, W))`` and returns an ``nn.Module`` whose first
convolution is reachable as ``conv1``. A model may expose ``aux_logits`` (a list of tensors its
forward sets in train mode); the trainer then adds ``aux_weight · Σ CE(aux)`` to the loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .checks import as_pair
from .registry import MODELS, get_model, register_model

__all__ = ["SimpleCNN", "DSSimpleCNN", "DS_SIMPLECNN", "aux_head", "conv_blocks", "MODELS",
           "BASELINES", "register_model", "build_model", "fc_dim", "reinit_"]

DS_SIMPLECNN = "ds-simplecnn"  # DSSimpleCNN's registered name (LION-DG's network)


def build_model(name: str, *, in_channels: int, n_classes: int,
                image_size: int | tuple[int, int]) -> nn.Module:
    """Build the architecture registered as ``name``; a ``KeyError`` lists the known names."""
    return get_model(name)(in_channels=in_channels, n_classes=n_classes,
                           image_size=as_pair(image_size, "image_size"))


def fc_dim(image_size: int | tuple[int, int], channels: int = 64, n_pools: int = 2) -> int:
    """Flattened size after ``n_pools`` 2×2 max-pools (floor): 28² → 3136, 32² → 4096, 8² → 256."""
    h, w = as_pair(image_size, "image_size")
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
        h, w = as_pair(image_size, "image_size")
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

    def head(self, h2: Tensor) -> Tensor:
        """The classifier on the second block's output: Flatten → FC → ReLU → FC."""
        return self.fc2(self.relu(self.fc1(self.flatten(h2))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(conv_blocks(self, x)[1])


def conv_blocks(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """SimpleCNN's two conv blocks, ``h1 = pool(relu(bn1(conv1(x))))`` and
    ``h2 = pool(relu(bn2(conv2(h1))))``, on any module with those layers (:class:`SimpleCNN`,
    :class:`DSSimpleCNN`, and the batched trainer's grouped stack of R SimpleCNNs)."""
    h1 = m.pool(m.relu(m.bn1(m.conv1(x))))
    return h1, m.pool(m.relu(m.bn2(m.conv2(h1))))


def aux_head(in_channels: int, n_classes: int, hidden: int = 64) -> nn.Sequential:
    """Auxiliary classifier: global average pool → Linear(→hidden) → ReLU → Linear(→n_classes)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_channels, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


@register_model(DS_SIMPLECNN)
class DSSimpleCNN(SimpleCNN):
    """Deeply-supervised SimpleCNN (LION-DG's network): an auxiliary head after each conv block
    (32 and 64 channels).

    ``forward(x)`` returns the main logits; in train mode it also sets ``self.aux_logits`` to the
    heads' logits ``[aux1, aux2]`` (``[]`` in eval mode, where the heads are not run).

    Args:
        in_channels: C_in.
        n_classes: outputs of the main classifier and of each head.
        image_size: H (square) or (H, W).
        aux_hidden: width of each head's hidden layer.

    Examples:
        >>> model = DSSimpleCNN(in_channels=1, n_classes=10, image_size=28)
        >>> logits = model(torch.randn(4, 1, 28, 28)); len(model.aux_logits)
        2
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10,
                 image_size: int | tuple[int, int] = 28, aux_hidden: int = 64) -> None:
        super().__init__(in_channels=in_channels, n_classes=n_classes, image_size=image_size)
        self.aux_heads = nn.ModuleList([
            aux_head(self.conv1.out_channels, n_classes, aux_hidden),
            aux_head(self.conv2.out_channels, n_classes, aux_hidden),
        ])
        self.aux_logits: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        h1, h2 = conv_blocks(self, x)
        out = self.head(h2)  # before the heads, as ever: autograd sums h2's gradients in order
        self.aux_logits = [self.aux_heads[0](h1), self.aux_heads[1](h2)] if self.training else []
        return out


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
