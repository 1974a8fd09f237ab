import numpy as np
import pytest
import torch


def _digits(size: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.from_numpy((load_digits().images / 16.0).astype(np.float32)).unsqueeze(1)
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear").clamp_(0, 1)


@pytest.fixture(scope="session")
def gray_batch() -> torch.Tensor:
    """256×1×28×28: real handwritten digits (scikit-learn's), upsampled to MNIST's size."""
    return _digits(28)[:256].contiguous()


@pytest.fixture(scope="session")
def color_batch() -> torch.Tensor:
    """256×3×32×32: digits at CIFAR's size, each channel with its own random gain and offset."""
    g = torch.Generator().manual_seed(0)
    x = _digits(32)[:256]
    gain = torch.rand(256, 3, 1, 1, generator=g) * 0.8 + 0.2
    offset = torch.rand(256, 3, 1, 1, generator=g) * 0.3
    noise = torch.rand(256, 3, 32, 32, generator=g) * 0.05
    return (x * gain + offset + noise).clamp_(0, 1).contiguous()
