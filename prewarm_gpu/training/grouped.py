"""R SimpleCNNs as one network, the run axis folded into channels: the ``grouped`` backend's.

A convolution with ``groups=R`` over R·C input channels is R independent convolutions, and a
BatchNorm over R·F channels is R per-run BatchNorms, so SimpleCNN's own forward
(:func:`prewarm_gpu.models.conv_blocks`) runs all R runs at once; the linear layers are
``baddbmm`` over stacked weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import conv_blocks

__all__ = ["GroupedSimpleCNN"]


class GroupedSimpleCNN(nn.Module):
    """R SimpleCNNs as one network: the run axis folded into channels, ``groups=R`` convolutions.

    Input ``(B, R·C, H, W)`` (run r's batch in channels ``[r·C, (r+1)·C)``). A BatchNorm over R·F
    channels *is* R per-run BatchNorms (each run owns its channels); the linear layers are
    ``baddbmm`` over stacked ``(R, out, in)`` weights. Output ``(R, B, classes)``.
    """

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        m0 = models[0]
        self.R = R = len(models)
        self.conv1 = self._conv(m0.conv1, [m.conv1 for m in models], R)
        self.bn1 = self._bn([m.bn1 for m in models])
        self.conv2 = self._conv(m0.conv2, [m.conv2 for m in models], R)
        self.bn2 = self._bn([m.bn2 for m in models])
        self.fc1_w = nn.Parameter(torch.stack([m.fc1.weight.detach() for m in models]))
        self.fc1_b = nn.Parameter(torch.stack([m.fc1.bias.detach() for m in models]))
        self.fc2_w = nn.Parameter(torch.stack([m.fc2.weight.detach() for m in models]))
        self.fc2_b = nn.Parameter(torch.stack([m.fc2.bias.detach() for m in models]))
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    @staticmethod
    def _conv(c0: nn.Conv2d, convs: list[nn.Conv2d], R: int) -> nn.Conv2d:
        conv = nn.Conv2d(c0.in_channels * R, c0.out_channels * R, c0.kernel_size, c0.stride,
                         c0.padding, c0.dilation, groups=R, bias=c0.bias is not None,
                         device=c0.weight.device, dtype=c0.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([c.weight for c in convs]))
            if c0.bias is not None:
                conv.bias.copy_(torch.cat([c.bias for c in convs]))
        return conv

    @staticmethod
    def _bn(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
        b0 = bns[0]
        bn = nn.BatchNorm2d(b0.num_features * len(bns), b0.eps, b0.momentum,
                            device=b0.weight.device, dtype=b0.weight.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(torch.cat([getattr(b, name) for b in bns]))
            bn.num_batches_tracked.copy_(b0.num_batches_tracked)
        return bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = conv_blocks(self, x)[1]  # SimpleCNN's blocks; groups=R keeps the runs apart
        x = x.reshape(B, self.R, -1).transpose(0, 1)  # (R, B, 64·h·w), each run's own flatten
        x = F.relu(torch.baddbmm(self.fc1_b[:, None], x, self.fc1_w.transpose(1, 2)))
        return torch.baddbmm(self.fc2_b[:, None], x, self.fc2_w.transpose(1, 2))

    @torch.no_grad()
    def write_back(self, models: list[nn.Module]) -> None:
        """Copy each run's slice of the stacked weights and buffers into its own model."""
        for r, m in enumerate(models):
            for name in ("conv1", "conv2"):
                src, dst = getattr(self, name), getattr(m, name)
                n = dst.out_channels
                dst.weight.copy_(src.weight[r * n : (r + 1) * n])
                if dst.bias is not None:
                    dst.bias.copy_(src.bias[r * n : (r + 1) * n])
            for name in ("bn1", "bn2"):
                src, dst = getattr(self, name), getattr(m, name)
                n = dst.num_features
                for t in ("weight", "bias", "running_mean", "running_var"):
                    getattr(dst, t).copy_(getattr(src, t)[r * n : (r + 1) * n])
                dst.num_batches_tracked.copy_(src.num_batches_tracked)
            m.fc1.weight.copy_(self.fc1_w[r])
            m.fc1.bias.copy_(self.fc1_b[r])
            m.fc2.weight.copy_(self.fc2_w[r])
            m.fc2.bias.copy_(self.fc2_b[r])
