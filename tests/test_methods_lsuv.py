"""LSUV (Mishkin & Matas 2016): unit output variance per layer, in execution order, nothing else."""

import pytest
import torch
from torch import nn

from prewarm_gpu.initializers import get
from prewarm_gpu.methods.lsuv import lsuv_


class Toy(nn.Module):
    """Registered in the *reverse* of execution order; in-place ReLUs right after the layers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.unused = nn.Linear(3, 3)  # excluded or an error: it never runs

    def forward(self, x):
        x = nn.functional.max_pool2d(self.relu(self.bn(self.conv1(x))), 2)
        x = self.relu(self.conv2(x))
        return self.fc(x.flatten(1))


@pytest.fixture
def images(digits_images, device):
    x = digits_images[:64]
    return ((x - x.mean()) / x.std()).to(device)


def _output_variances(model, x, names):
    """Var of each named layer's own output, BatchNorm in eval mode (as LSUV measures)."""
    out, hooks = {}, []
    for n in names:
        m = model.get_submodule(n)
        hooks.append(m.register_forward_hook(
            lambda mod, a, o, n=n: out.__setitem__(n, float(o.double().var(unbiased=False)))))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was)
    for h in hooks:
        h.remove()
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, state):
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_unit_variance_in_execution_order(images, device):
    model = Toy().to(device)
    report = lsuv_(model, images, exclude=["unused"], generator=0)
    assert report["order"] == ["conv1", "conv2", "fc"]  # not the registration order
    var = _output_variances(model, images, report["order"])
    for name, v in var.items():
        assert abs(v - 1) < 0.02, (name, v)
        assert report["variance"][name] == pytest.approx(v, abs=1e-6)  # the layer's own output
    assert all(report["converged"].values())


def test_modes_and_batchnorm_buffers_restored(images, device):
    model = Toy().to(device)
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
    buffers = {k: v.clone() for k, v in model.bn.state_dict().items()}
    model.train()
    model.relu.eval()  # a module with its own mode keeps it
    lsuv_(model, images, exclude=["unused"], generator=0)
    assert model.training and model.bn.training and not model.relu.training
    for k, v in model.bn.state_dict().items():
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
    model.eval()
    lsuv_(model, images, exclude=["unused"], generator=0)
    assert not any(m.training for m in model.modules())


def test_excluded_modules_untouched_and_orthonormal_preinit(images, device):
    model = Toy().to(device)
    before = _state(model)
    lsuv_(model, images, exclude=["unused", "conv2"], generator=0)
    for k in ("conv2.weight", "conv2.bias", "unused.weight", "bn.weight"):
        torch.testing.assert_close(model.state_dict()[k], before[k], rtol=0, atol=0)
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])
    assert float(model.fc.bias.detach().abs().max()) == 0.0  # biases zeroed by the pre-init
    # Orthonormal rows (out ≤ fan_in), times one scalar per layer.
    w = model.fc.weight.detach().double()
    gram = w @ w.T
    torch.testing.assert_close(gram / gram[0, 0], torch.eye(5, dtype=gram.dtype, device=device),
                               rtol=0, atol=1e-5)


def test_deterministic_and_global_rng_untouched(images, device):
    a, b, c = Toy().to(device), Toy().to(device), Toy().to(device)
    state = torch.random.get_rng_state()
    for m, seed in ((a, 3), (b, 3), (c, 4)):
        lsuv_(m, images, exclude=["unused"], generator=seed)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a.conv1.weight, b.conv1.weight, rtol=0, atol=0)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_registered_entry_takes_dict_data_and_options(images, device):
    model = Toy().to(device)
    report = get("lsuv")(model, data={"images": images, "raw": images}, generator=0,
                         tol=0.1, max_iter=5, exclude=["unused"])
    assert report["order"] == ["conv1", "conv2", "fc"]


def test_layer_that_never_runs_is_an_error_and_model_unchanged(images, device):
    model = Toy().to(device)
    before = _state(model)
    with pytest.raises(RuntimeError, match="unused"):
        lsuv_(model, images, generator=0)
    _assert_state_equal(model, before)


def test_zero_variance_is_an_error_and_model_unchanged(images, device):
    model = Toy().to(device)
    before = _state(model)
    with pytest.raises(ValueError, match="variance of layer 'conv1'"):
        lsuv_(model, torch.zeros_like(images), exclude=["unused"], generator=0)
    _assert_state_equal(model, before)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"data": None}, ValueError, "needs data"),
        ({"tol": 0}, ValueError, "tol"),
        ({"max_iter": -1}, ValueError, "max_iter"),
        ({"exclude": ["nope"]}, ValueError, "no module named"),
    ],
)
def test_bad_input(images, device, kwargs, error, match):
    model = Toy().to(device)
    before = _state(model)
    kwargs = {"data": images, **kwargs}
    with pytest.raises(error, match=match):
        get("lsuv")(model, generator=0, **kwargs)
    _assert_state_equal(model, before)


def test_model_without_conv_or_linear(images):
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Conv3d/Linear"):
        lsuv_(nn.Sequential(nn.BatchNorm2d(1)), images.cpu())
