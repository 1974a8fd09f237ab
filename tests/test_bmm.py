"""The ``bmm`` backend: SimpleCNN's layers as batched matrix products over the runs."""

import copy

import pytest
import torch

from prewarm_gpu.models import SimpleCNN
from prewarm_gpu.train import TrainConfig, train_batched
from prewarm_gpu.training.bmm import BmmSimpleCNN


def _models(n, c=1, size=8, dtype=torch.float32):
    out = []
    for s in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)
            out.append(SimpleCNN(c, 10, size).to(dtype))
    return out


@pytest.mark.parametrize("size", [(12, 10), (9, 9)])  # odd sizes: the pools floor
def test_forward_backward_and_write_back_equal_the_models_in_float64(size):
    models = _models(3, c=3, size=size, dtype=torch.float64)
    ref = copy.deepcopy(models)
    net = BmmSimpleCNN(models, size)
    x = torch.randn(3, 5, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = net(x.permute(0, 1, 3, 4, 2))
    want = torch.stack([m(x[r]) for r, m in enumerate(ref)])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    out.square().sum().backward()
    want.square().sum().backward()
    g = ref[1].conv2.weight.grad.permute(0, 2, 3, 1).reshape(64, -1)
    torch.testing.assert_close(net.conv2_w.grad[1], g, rtol=0, atol=1e-12)
    torch.testing.assert_close(net.fc1_b.grad[2], ref[2].fc1.bias.grad, rtol=0, atol=1e-12)
    net.write_back(models)  # weights unchanged, BatchNorm buffers updated by the forward
    for m, r in zip(models, ref, strict=True):
        for (name, a), b in zip(m.state_dict().items(), r.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_equals_loop_backend(digits, one_thread, dtype):
    """Each run trains as on the loop backend: in float64 to the logged losses' float32 rounding
    (1e-6, as tests/test_batched.py); in fp32 within the grouped backend's bound there (the
    summation order differs): the first 8 steps to 1e-4, all 50 to 1e-3, accuracies within one
    test image."""
    cfg = TrainConfig(steps=50, eval_points=2, loss_points=50)
    data = copy.copy(digits)
    if dtype == torch.float64:
        data._a, data._b = digits._a.double(), digits._b.double()  # standardise in float64
    first, every = (1e-6, 1e-6) if dtype == torch.float64 else (1e-4, 1e-3)
    a, b = _models(2, dtype=dtype), _models(2, dtype=dtype)
    ra = train_batched(a, data, cfg, seeds=[1, 2], backend="bmm")
    rb = train_batched(b, data, cfg, seeds=[1, 2], backend="loop", channels_last=False)
    for x, y in zip(ra, rb, strict=True):
        lx, ly = torch.tensor(x.loss), torch.tensor(y.loss)
        torch.testing.assert_close(lx[:8], ly[:8], rtol=0, atol=first)
        torch.testing.assert_close(lx, ly, rtol=0, atol=every)
        assert abs(x.accuracy - y.accuracy) <= 1 / 360 + 1e-12
    for ma, mb in zip(a, b, strict=True):  # written back into the models
        torch.testing.assert_close(ma.conv1.weight, mb.conv1.weight, rtol=0, atol=every * 10)
