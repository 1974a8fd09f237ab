"""Gabor first layer (Rivas & Rai 2023): centred grid, zero mean, Kaiming std, seeded, one layer."""

import math

import pytest
import torch
from torch import nn

from prewarm_gpu.initializers import get
from prewarm_gpu.methods.gabor import gabor_, gabor_kernels


def _model(cin=3, k=3):
    return nn.Sequential(nn.Conv2d(cin, 16, k), nn.ReLU(), nn.Conv2d(16, 8, 3))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_kernel_by_hand():
    one = torch.ones(1, dtype=torch.float64)
    sigma, theta, lambd, psi, gamma = 2.0, math.pi / 6, 4.0, 0.3, 0.9
    g = gabor_kernels(sigma * one, theta * one, lambd * one, psi * one, gamma * one, (3, 5))[0]
    y, x = 1.0 - 1.0, 4.0 - 2.0  # row 1 and column 4 of a 3×5 kernel, centred
    xr = x * math.cos(theta) + y * math.sin(theta)
    yr = -x * math.sin(theta) + y * math.cos(theta)
    expected = math.exp(-(xr**2 + gamma**2 * yr**2) / (2 * sigma**2)) * math.cos(
        2 * math.pi * xr / lambd + psi)
    assert float(g[1, 4]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 4), (3, 5)])
def test_centred_grid_is_symmetric(kernel_size):
    # θ = 0, ψ = 0: an even function of x and y, so the kernel is mirror-symmetric about its centre
    # (Ulm et al.'s linspace grid [-2, -0.5, 1] is not).
    z, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    g = gabor_kernels(2 * one, z, 5 * one, z, one, kernel_size)[0]
    torch.testing.assert_close(g, g.flip(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(g, g.flip(1), rtol=0, atol=1e-15)
    assert float(g.max()) == pytest.approx(float(g[(kernel_size[0] - 1) // 2,
                                                   (kernel_size[1] - 1) // 2]))


@pytest.mark.parametrize("cin, k", [(1, 3), (3, 3), (3, (3, 5))])
def test_zero_mean_kaiming_std_same_filter_per_channel(device, cin, k):
    model = _model(cin, k).to(device)
    before = _state(model)
    report = get("gabor")(model, generator=0)
    w = model[0].weight.detach().double()
    kh, kw = w.shape[2:]
    assert report["layer"] == "0"
    torch.testing.assert_close(w.mean((2, 3)), torch.zeros_like(w[:, :, 0, 0]), rtol=0, atol=1e-7)
    assert float(w.std(unbiased=False)) == pytest.approx(math.sqrt(2 / (cin * kh * kw)), rel=1e-5)
    torch.testing.assert_close(w, w[:, :1].expand_as(w), rtol=0, atol=0)
    # Only this layer's weight changed.
    for key in ("0.bias", "2.weight", "2.bias"):
        torch.testing.assert_close(model.state_dict()[key], before[key], rtol=0, atol=0)


def test_deterministic_and_global_rng_untouched(device):
    a, b, c = _model().to(device), _model().to(device), _model().to(device)
    state = torch.random.get_rng_state()
    for m, seed in ((a, 1), (b, 1), (c, 2)):
        get("gabor")(m, generator=seed)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a[0].weight, b[0].weight, rtol=0, atol=0)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_named_layer_and_ranges(device):
    model = _model().to(device)
    before = _state(model)
    get("gabor")(model, generator=0, layer="2", theta=(0.0, 0.0))
    torch.testing.assert_close(model[0].weight, before["0.weight"], rtol=0, atol=0)
    assert not torch.equal(model[2].weight, before["2.weight"])


def test_tensor_api_with_torch_generator():
    w = gabor_(torch.empty(32, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    assert float(w.std(unbiased=False)) == pytest.approx(math.sqrt(2 / 9), rel=1e-5)


@pytest.mark.parametrize(
    "model, kwargs, error, match",
    [
        (nn.Sequential(nn.Linear(3, 3)), {}, ValueError, "no nn.Conv2d"),
        (_model(), {"layer": "1"}, TypeError, "not an nn.Conv2d"),
        (_model(), {"layer": "nope"}, ValueError, "no module named"),
        (_model(k=1), {}, ValueError, "zero-mean"),
        (_model(), {"sigma": (2.0, 1.0)}, ValueError, "low <= high"),
        (_model(), {"omega": (0, 1)}, TypeError, "unknown options"),
    ],
)
def test_bad_input_leaves_model_unchanged(model, kwargs, error, match):
    before = _state(model)
    with pytest.raises(error, match=match):
        get("gabor")(model, generator=0, **kwargs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
