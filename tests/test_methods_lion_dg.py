"""LION-DG: the deeply-supervised SimpleCNN, zero-initialised head outputs, gradient awakening."""

import math

import pytest
import torch
import torch.nn.functional as F

from prewarm_gpu.initializers import get
from prewarm_gpu.methods.lion_dg import DSSimpleCNN
from prewarm_gpu.models import MODELS, SimpleCNN, build_model

HEAD_LAST = ["aux_heads.0.4", "aux_heads.1.4"]
HEAD_INNER = ["aux_heads.0.2", "aux_heads.1.2"]


@pytest.fixture
def batch(digits_images, device):
    x = digits_images[:32]
    y = torch.arange(32) % 10
    return ((x - x.mean()) / x.std()).to(device), y.to(device)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_model_registered_and_aux_logits_in_train_mode_only(device):
    assert MODELS["ds-simplecnn"] is DSSimpleCNN
    model = build_model("ds-simplecnn", in_channels=3, n_classes=7, image_size=(8, 12)).to(device)
    x = torch.randn(4, 3, 8, 12, device=device)
    assert model(x).shape == (4, 7)
    assert [a.shape for a in model.aux_logits] == [(4, 7), (4, 7)]
    model.eval()
    assert model(x).shape == (4, 7) and model.aux_logits == []
    assert get("lion_dg").requires_model == get("lsuv_lion_dg").requires_model == "ds-simplecnn"


def test_heads_zero_backbone_he(device):
    model = DSSimpleCNN(1, 10, 8).to(device)
    report = get("lion_dg")(model, generator=0)
    assert report["zeroed"] == HEAD_LAST
    for name in HEAD_LAST:
        m = model.get_submodule(name)
        assert not m.weight.detach().any() and not m.bias.detach().any()
    w = model.conv2.weight.detach().double()
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)
    assert not model.conv2.bias.detach().any()
    assert model.get_submodule(HEAD_INNER[0]).weight.detach().any()


def test_gradient_awakening_at_step_zero(batch, device):
    x, y = batch
    model = DSSimpleCNN(1, 10, 8).to(device)
    get("lion_dg")(model, generator=0)
    model.train()
    model(x)
    aux_loss = sum(F.cross_entropy(a, y) for a in model.aux_logits)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(aux_loss, list(params.values()),
                                                 allow_unused=True), strict=True))
    for name, g in grads.items():
        if any(name.startswith(h + ".") for h in HEAD_LAST):
            assert g is not None and g.any(), name  # only the zeroed layers learn at step 0
        else:
            assert g is None or not g.any(), name  # backbone and inner head layers: exactly 0
    main = F.cross_entropy(model(x), y)
    assert torch.autograd.grad(main, model.conv1.weight)[0].any()


def test_lsuv_hybrid(batch, device):
    x, _ = batch
    model = DSSimpleCNN(1, 10, 8).to(device)
    report = get("lsuv_lion_dg")(model, data=x, generator=0)
    assert report["order"] == ["conv1", "conv2", "fc1", "fc2", *HEAD_INNER]
    assert report["zeroed"] == HEAD_LAST
    assert all(abs(v - 1) < 0.02 for v in report["variance"].values())
    for name in HEAD_LAST:
        assert not model.get_submodule(name).weight.detach().any()
    assert model.training


def test_deterministic_and_global_rng_untouched(device):
    a, b = DSSimpleCNN(1, 10, 8).to(device), DSSimpleCNN(1, 10, 8).to(device)
    state = torch.random.get_rng_state()
    get("lion_dg")(a, generator=3)
    get("lion_dg")(b, generator=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("lion_dg", {}, ValueError, "deeply-supervised"),
        ("lion_dg", {"heads": ["nope"]}, ValueError, "no module named"),
        ("lsuv_lion_dg", {}, ValueError, "needs data"),
    ],
)
def test_bad_input_leaves_model_unchanged(name, kwargs, error, match):
    model = SimpleCNN(1, 10, 8) if name == "lion_dg" and not kwargs else DSSimpleCNN(1, 10, 8)
    before = _state(model)
    with pytest.raises(error, match=match):
        get(name)(model, generator=0, **kwargs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
