"""R SimpleCNNs as batched matrix products: the run axis is the batch axis of every product.

The ``bmm`` training backend (:mod:`prewarm_gpu.batched`). Grouped convolutions with 32–64
channels per group use a GPU's tensor cores poorly (``../shared/notes/gpu-facts.md``); here each
convolution is its patches times the run's filters, one ``torch.baddbmm`` for all runs:

.. math::
    Y_r = X_r^{\\text{taps}}\\, W_r^\\top + b_r, \\qquad
    X_r^{\\text{taps}} \\in \\mathbb{R}^{(B H W) \\times (K_h K_w C)}

Activations stay channels-last per run, ``(R, B, H, W, C)``, from the input to the classifier, so
no layer permutes them: the 3×3 taps are nine shifted slices of the padded input, each filter is
stored as ``(K_h, K_w, C)`` to match, and ``fc1``'s columns are stored in ``(h, w, C)`` order (the
models' own layouts are restored by :meth:`BmmSimpleCNN.write_back`). BatchNorm is
per run and per channel over ``(B, H, W)``, with ``nn.BatchNorm2d``'s train-mode semantics:
biased batch variance for the output, the unbiased one (``n/(n-1)``) into the running variance,
``momentum`` 0.1. The same arithmetic as the other backends up to fp32 summation order (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _taps(x: torch.Tensor, kernel: tuple[int, int],
          padding: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(R, B, H, W, C) → ((R, B·H'·W', K_h·K_w·C), (H', W')): every window's values, tap-major."""
    R, B, H, W, C = x.shape
    (kh, kw), (ph, pw) = kernel, padding
    xp = F.pad(x, (0, 0, pw, pw, ph, ph))
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    cols = torch.stack([xp[:, :, i : i + Ho, j : j + Wo] for i in range(kh) for j in range(kw)], 4)
    return cols.reshape(R, B * Ho * Wo, kh * kw * C), (Ho, Wo)


def _pool2(x: torch.Tensor) -> torch.Tensor:
    """2×2 max-pool (floor, as ``nn.MaxPool2d(2)``) of (R, B, H, W, C)."""
    R, B, H, W, C = x.shape
    x = x[:, :, : H // 2 * 2, : W // 2 * 2]
    return x.reshape(R, B, H // 2, 2, W // 2, 2, C).amax((3, 5))


class BmmSimpleCNN(nn.Module):
    """R :class:`~prewarm_gpu.models.SimpleCNN` s with stacked weights; input (R, B, H, W, C)
    channels-last, output (R, B, classes)."""

    def __init__(self, models: list[nn.Module], image_size: tuple[int, int]):
        super().__init__()
        m0 = models[0]
        self.R = len(models)
        for name in ("conv1", "conv2"):
            c = getattr(m0, name)
            if c.stride != (1, 1) or c.dilation != (1, 1) or c.groups != 1 or c.bias is None:
                raise ValueError(f"the bmm backend needs SimpleCNN's stride-1, biased {name}")
            w = torch.stack([getattr(m, name).weight.detach() for m in models])  # (R, F, C, kh, kw)
            self.register_parameter(f"{name}_w", nn.Parameter(
                w.permute(0, 1, 3, 4, 2).reshape(self.R, w.shape[1], -1).contiguous()))
            self.register_parameter(f"{name}_b", nn.Parameter(
                torch.stack([getattr(m, name).bias.detach() for m in models])))
        self.kernels = [tuple(m0.conv1.kernel_size), tuple(m0.conv2.kernel_size)]
        self.paddings = [tuple(m0.conv1.padding), tuple(m0.conv2.padding)]
        for name in ("bn1", "bn2"):
            bns = [getattr(m, name) for m in models]
            self.register_parameter(f"{name}_w", nn.Parameter(torch.stack([b.weight.detach()
                                                                           for b in bns])))
            self.register_parameter(f"{name}_b", nn.Parameter(torch.stack([b.bias.detach()
                                                                           for b in bns])))
            self.register_buffer(f"{name}_mean", torch.stack([b.running_mean for b in bns]))
            self.register_buffer(f"{name}_var", torch.stack([b.running_var for b in bns]))
            self.register_buffer(f"{name}_count", bns[0].num_batches_tracked.clone())
        self.eps, self.momentum = m0.bn1.eps, m0.bn1.momentum
        h, w = image_size
        for (kh, kw), (ph, pw) in zip(self.kernels, self.paddings, strict=True):
            h, w = (h + 2 * ph - kh + 1) // 2, (w + 2 * pw - kw + 1) // 2
        self.fc_shape = (m0.conv2.out_channels, h, w)  # the flattened block output, (C, h, w)
        fc1 = torch.stack([m.fc1.weight.detach() for m in models])  # (R, 256, C·h·w)
        if fc1.shape[2] != m0.conv2.out_channels * h * w:
            raise ValueError(f"fc1 takes {fc1.shape[2]} inputs, but {image_size} images give "
                             f"{m0.conv2.out_channels}×{h}×{w}")
        R, out = fc1.shape[:2]  # columns reordered (C, h, w) → (h, w, C), the activations' order
        self.fc1_w = nn.Parameter(fc1.reshape(R, out, -1, h, w).permute(0, 1, 3, 4, 2)
                                  .reshape(R, out, -1).contiguous())
        self.fc1_b = nn.Parameter(torch.stack([m.fc1.bias.detach() for m in models]))
        self.fc2_w = nn.Parameter(torch.stack([m.fc2.weight.detach() for m in models]))
        self.fc2_b = nn.Parameter(torch.stack([m.fc2.bias.detach() for m in models]))

    def _bn(self, y: torch.Tensor, i: int) -> torch.Tensor:
        """Per-run BatchNorm of y (R, N, C) over N; updates the running buffers in train mode."""
        w, b = getattr(self, f"bn{i}_w")[:, None], getattr(self, f"bn{i}_b")[:, None]
        mean_buf, var_buf = getattr(self, f"bn{i}_mean"), getattr(self, f"bn{i}_var")
        if not self.training:
            return (y - mean_buf[:, None]) * torch.rsqrt(var_buf[:, None] + self.eps) * w + b
        var, mean = torch.var_mean(y, dim=1, unbiased=False, keepdim=True)
        with torch.no_grad():
            n = y.shape[1]
            # Under bf16 autocast y (and so its statistics) is bf16; the buffers stay float32,
            # as nn.BatchNorm's do (the cast is a no-op in fp32).
            mean_buf.lerp_(mean[:, 0].to(mean_buf.dtype), self.momentum)
            var_buf.lerp_((var[:, 0] * (n / max(n - 1, 1))).to(var_buf.dtype), self.momentum)
            getattr(self, f"bn{i}_count").add_(1)
        return (y - mean) * torch.rsqrt(var + self.eps) * w + b

    def _block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """pool(relu(bn(conv(x)))) on (R, B, H, W, C) channels-last."""
        R, B = x.shape[:2]
        cols, (Ho, Wo) = _taps(x, self.kernels[i - 1], self.paddings[i - 1])
        w, b = getattr(self, f"conv{i}_w"), getattr(self, f"conv{i}_b")
        y = torch.baddbmm(b[:, None], cols, w.transpose(1, 2))  # (R, B·Ho·Wo, F)
        y = F.relu(self._bn(y, i))
        return _pool2(y.reshape(R, B, Ho, Wo, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._block(self._block(x, 1), 2)  # (R, B, h, w, C)
        h = h.reshape(h.shape[0], h.shape[1], -1)
        h = F.relu(torch.baddbmm(self.fc1_b[:, None], h, self.fc1_w.transpose(1, 2)))
        return torch.baddbmm(self.fc2_b[:, None], h, self.fc2_w.transpose(1, 2))

    @torch.no_grad()
    def write_back(self, models: list[nn.Module]) -> None:
        """Copy each run's weights and buffers back into its model, in the models' layouts."""
        for r, m in enumerate(models):
            for i, name in ((1, "conv1"), (2, "conv2")):
                conv = getattr(m, name)
                kh, kw = conv.kernel_size
                w = getattr(self, f"{name}_w")[r].reshape(conv.out_channels, kh, kw, -1)
                conv.weight.copy_(w.permute(0, 3, 1, 2))
                conv.bias.copy_(getattr(self, f"{name}_b")[r])
                bn = getattr(m, f"bn{i}")
                bn.weight.copy_(getattr(self, f"bn{i}_w")[r])
                bn.bias.copy_(getattr(self, f"bn{i}_b")[r])
                bn.running_mean.copy_(getattr(self, f"bn{i}_mean")[r])
                bn.running_var.copy_(getattr(self, f"bn{i}_var")[r])
                bn.num_batches_tracked.copy_(getattr(self, f"bn{i}_count"))
            c, h, w = self.fc_shape
            fc1 = self.fc1_w[r].reshape(-1, h, w, c).permute(0, 3, 1, 2)
            m.fc1.weight.copy_(fc1.reshape(fc1.shape[0], -1))
            m.fc1.bias.copy_(self.fc1_b[r])
            m.fc2.weight.copy_(self.fc2_w[r])
            m.fc2.bias.copy_(self.fc2_b[r])
