"""SimpleCNN (§3.1) layer by layer, and the model registry."""

import pytest
import torch
from torch import nn

from prewarm_gpu import registry
from prewarm_gpu.models import MODELS, SimpleCNN, build_model, fc_dim, register_model


@pytest.mark.parametrize("size, expected", [(28, 3136), (32, 4096), (8, 256), ((28, 32), 3584)])
def test_fc_dim_matches_the_paper(size, expected):
    assert fc_dim(size) == expected
    h, w = (size, size) if isinstance(size, int) else size
    m = SimpleCNN(in_channels=1, n_classes=10, image_size=size)
    assert m.fc1.in_features == expected
    assert m(torch.zeros(2, 1, h, w)).shape == (2, 10)


def test_layers_are_those_of_section_3_1():
    m = SimpleCNN(in_channels=3, n_classes=100, image_size=32)
    c1, c2 = m.conv1, m.conv2
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.padding) == (3, 32, (3, 3), (1, 1))
    assert (c2.in_channels, c2.out_channels, c2.kernel_size, c2.padding) == (32, 64, (3, 3), (1, 1))
    assert m.bn1.num_features == 32 and m.bn2.num_features == 64
    assert (m.fc1.in_features, m.fc1.out_features) == (4096, 256)
    assert (m.fc2.in_features, m.fc2.out_features) == (256, 100)
    assert isinstance(m.pool, nn.MaxPool2d) and m.pool.kernel_size == 2


def test_parameter_count_by_hand_mnist():
    # conv1 1·32·9 + 32, bn1 2·32, conv2 32·64·9 + 64, bn2 2·64, fc1 3136·256 + 256, fc2 256·10 + 10
    expected = (288 + 32) + 64 + (18432 + 64) + 128 + (802816 + 256) + (2560 + 10)
    m = SimpleCNN(in_channels=1, n_classes=10, image_size=28)
    assert sum(p.numel() for p in m.parameters()) == expected == 824650


def test_forward_order_conv_bn_relu_pool():
    # Operation order: each block is conv → BN → ReLU → pool (recorded with forward hooks).
    m = SimpleCNN(1, 10, 8)
    seen = []
    for name in ("conv1", "bn1", "conv2", "bn2", "fc1", "fc2", "pool", "relu"):
        getattr(m, name).register_forward_hook(lambda mod, a, o, n=name: seen.append(n))
    m(torch.randn(2, 1, 8, 8))
    assert seen == ["conv1", "bn1", "relu", "pool", "conv2", "bn2", "relu", "pool", "fc1", "relu",
                    "fc2"]


def test_registry_builds_warns_on_overwrite_and_names_known_models(monkeypatch):
    monkeypatch.setattr(registry, "MODELS", dict(MODELS))
    assert isinstance(build_model("simplecnn", in_channels=1, n_classes=10, image_size=8),
                      SimpleCNN)

    @register_model("tiny-test")
    class Tiny(SimpleCNN):
        pass

    assert registry.MODELS["tiny-test"] is Tiny
    with pytest.warns(UserWarning, match="registered again"):
        register_model("tiny-test")(Tiny)
    with pytest.raises(KeyError, match="known: .*simplecnn"):
        build_model("nope", in_channels=1, n_classes=10, image_size=8)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="at least 4×4"):
        SimpleCNN(1, 10, 3)
    with pytest.raises(ValueError, match="n_classes"):
        SimpleCNN(1, 0, 8)


def test_reinit_he_uniform_draws_within_sqrt_6_over_fan_in_and_is_seeded():
    import math

    from prewarm_gpu.models import reinit_

    def build(seed):
        m = SimpleCNN(in_channels=1, n_classes=10, image_size=8)
        return reinit_(m, "he-uniform", generator=torch.Generator().manual_seed(seed))

    a, b, c = build(0), build(0), build(1)
    bound = math.sqrt(6 / a.fc1.in_features)
    assert float(a.fc1.weight.detach().abs().max()) <= bound
    assert float(a.fc1.weight.detach().abs().max()) > 0.95 * bound  # the whole range is used
    assert torch.equal(a.conv2.weight, b.conv2.weight)
    assert not torch.equal(a.conv2.weight, c.conv2.weight)
    with pytest.raises(ValueError, match="baseline must be one of"):
        reinit_(a, "orthogonal")
