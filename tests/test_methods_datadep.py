"""Krähenbühl et al. (2016): within-layer statistics, patch geometry, between-layer scaling."""

import math

import pytest
import torch
from torch import nn

from prewarm_gpu.initializers import get
from prewarm_gpu.methods import datadep as dd
from prewarm_gpu.methods._common import measurement_mode


class Toy(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@pytest.fixture
def images(digits_images, device):
    x = digits_images[:64]
    return ((x - x.mean()) / x.std()).to(device)


def _preactivations(model, x, names):
    """Each named layer's output on x, in LSUV/datadep's measurement mode."""
    out, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: out.__setitem__(n, o.detach().double().clone())))
    with torch.no_grad(), measurement_mode(model):
        model(x)
    for h in hooks:
        h.remove()
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["gaussian", "pca", "kmeans"])
def test_within_layer_mean_beta_std_one(images, device, variant):
    model = Toy().to(device)
    report = dd.datadep_(model, images, variant=variant, between_layer=False, max_samples=1000,
                         generator=0)
    assert report["order"] == ["conv1", "conv2", "fc1", "fc2"]
    assert report["weights"]["conv2"] == variant
    acts = _preactivations(model, images, report["order"])
    for name, a in acts.items():
        dims = (0, 2, 3) if a.ndim == 4 else (0,)
        torch.testing.assert_close(a.mean(dims), torch.full_like(a.mean(dims), 0.1),
                                   rtol=0, atol=1e-4, msg=name)
        torch.testing.assert_close(a.std(dims, unbiased=False), torch.ones_like(a.mean(dims)),
                                   rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, padding=2, stride=2, dilation=2),
        nn.Conv2d(2, 3, (3, 2), padding=1, padding_mode="reflect"),
        nn.Conv2d(2, 3, 3, padding="same", bias=False),
        nn.Conv2d(2, 3, (2, 3), stride=(1, 2)),
    ],
)
def test_layer_inputs_follow_the_conv_geometry(conv):
    x = torch.randn(2, 2, 7, 6, generator=torch.Generator().manual_seed(0))
    rows = dd.layer_inputs(conv, x)
    with torch.no_grad():
        y = conv(x)
        if conv.bias is not None:
            y = y - conv.bias.view(1, -1, 1, 1)
    expected = y.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(rows @ conv.weight.detach().flatten(1).T, expected,
                               rtol=1e-5, atol=1e-5)


def _log_ratio_spread(model, x, layers, draws=8):
    """max - min over layers of log r_k, each averaged over several random top gradients."""
    logs = []
    with torch.no_grad(), measurement_mode(model):
        for seed in range(draws):
            g = torch.Generator(x.device).manual_seed(100 + seed)
            logs.append({k: math.log(v) for k, v in dd._gradient_ratios(model, x, layers, g, {})
                         .items()})
    mean = [sum(d[n] for d in logs) / draws for n, _ in layers]
    return max(mean) - min(mean)


def test_between_layer_equalises_the_gradient_ratios(digits_images, device):
    x = digits_images[:256].to(device)
    model = Toy().to(device)
    dd.datadep_(model, x, variant="gaussian", between_layer=False, generator=0)
    with torch.no_grad():  # unbalance the layers: r_conv2 / 64, r_fc1 · 64
        model.conv2.weight.mul_(8)
        model.fc1.weight.div_(8)
    layers = [(n, model.get_submodule(n)) for n in ("conv1", "conv2", "fc1", "fc2")]
    before = _log_ratio_spread(model, x, layers)
    with torch.no_grad(), measurement_mode(model):
        report = dd._between_layer_(model, x, layers, torch.Generator(device).manual_seed(0),
                                    max_rounds=10, tol=0.01)
    after = _log_ratio_spread(model, x, layers)
    assert report["rounds"] >= 1
    assert before > 4 and after < 0.15 * before, (before, after)


def test_between_layer_leaves_the_output_unchanged(images, device):
    within = Toy().to(device)
    dd.datadep_(within, images, variant="pca", between_layer=False, generator=0)
    both = Toy().to(device)
    report = dd.datadep_(both, images, variant="pca", max_rounds=3, generator=0)["between_layer"]
    assert report["rounds"] >= 1
    # ReLU + BatchNorm(eval, fresh) is positively homogeneous: biases follow the input's scale,
    # and ∏ α_k = 1, so the network's output is unchanged.
    with torch.no_grad(), measurement_mode(within):
        a = within(images).double()
    with torch.no_grad(), measurement_mode(both):
        b = both(images).double()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_layer_without_bias_gets_unit_std_only(images, device):
    model = Toy(bias=False).to(device)
    report = dd.datadep_(model, images, variant="pca", between_layer=False, generator=0)
    assert report["no_bias"] == ["conv1"]
    a = _preactivations(model, images, ["conv1"])["conv1"]
    torch.testing.assert_close(a.std((0, 2, 3), unbiased=False), torch.ones(6, dtype=a.dtype,
                               device=a.device), rtol=0, atol=1e-4)


def test_grouped_conv_and_too_few_rows_fall_back_to_gaussian(images, device):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 80)).to(device)
    report = dd.datadep_(model, images, variant="kmeans", between_layer=False, max_samples=500,
                         generator=0)
    assert report["weights"]["0"] == "kmeans"
    assert report["weights"]["1"].startswith("gaussian (fallback: groups=4")
    assert report["weights"]["3"].startswith("gaussian (fallback: 64 input rows < 80")


def test_off_path_heads_keep_their_statistics(digits_images, device):
    from prewarm_gpu.methods.lion_dg import DSSimpleCNN

    x = digits_images[:32].to(device)
    model = DSSimpleCNN(1, 10, 8, aux_hidden=8).to(device)
    report = dd.datadep_(model, x, variant="gaussian", max_rounds=2, generator=0)
    assert report["between_layer"]["rounds"] >= 1
    assert "aux_heads.0.4" not in report["between_layer"]["ratios"]
    a = _preactivations(model, x, ["aux_heads.0.2"])["aux_heads.0.2"]
    torch.testing.assert_close(a.mean(0), torch.full_like(a.mean(0), 0.1), rtol=0, atol=1e-3)
    torch.testing.assert_close(a.std(0, unbiased=False), torch.ones_like(a.mean(0)),
                               rtol=0, atol=1e-3)


def test_deterministic_registered_names_and_global_rng(images, device):
    a, b = Toy().to(device), Toy().to(device)
    state = torch.random.get_rng_state()
    opts = {"max_samples": 500, "max_rounds": 2}
    ra = get("datadep_kmeans")(a, data=images, generator=5, **opts)
    rb = get("datadep")(b, data={"images": images}, generator=5, variant="kmeans", **opts)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert ra == rb
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0, msg=k)
    assert get("datadep_pca") is not get("datadep_gaussian")


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("datadep", {"data": None}, ValueError, "needs data"),
        ("datadep", {"variant": "zca"}, ValueError, "variant must be one of"),
        ("datadep", {"max_rounds": -1}, ValueError, "max_rounds"),
        ("datadep", {"exclude": "nope"}, ValueError, "no module named"),
        ("datadep_pca", {"variant": "kmeans"}, TypeError, "fixes variant"),
    ],
)
def test_bad_input_leaves_model_unchanged(images, device, name, kwargs, error, match):
    model = Toy().to(device)
    before = _state(model)
    kwargs = {"data": images, **kwargs}
    with pytest.raises(error, match=match):
        get(name)(model, generator=0, **kwargs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_model_without_conv2d_or_linear(images):
    with pytest.raises(ValueError, match="no Conv2d/Linear"):
        dd.datadep_(nn.Sequential(nn.Conv1d(1, 2, 3)), images.cpu())
