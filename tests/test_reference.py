"""The reference's closed-form rules against hand-computed values and the paper's worked numbers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import reference


def test_distance_weights_k3_by_hand():
    w = reference.distance_weights(3).reshape(3, 3)
    expected = np.array([[1 / 3, 1 / 2, 1 / 3], [1 / 2, 1.0, 1 / 2], [1 / 3, 1 / 2, 1 / 3]])
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-15)


def test_distance_weights_k5_corner_and_centre():
    w = reference.distance_weights(5).reshape(5, 5)
    assert w[2, 2] == 1.0 and w[0, 0] == pytest.approx(1 / 5) and w[0, 2] == pytest.approx(1 / 3)


def test_otsu_on_synthetic_bimodal_image():
    rng = np.random.default_rng(0)
    dark = rng.normal(0.15, 0.03, size=7000)
    bright = rng.normal(0.85, 0.03, size=3000)
    x = np.clip(np.concatenate([dark, bright]), 0, 1)
    tau = reference.otsu_threshold(x)
    # Every threshold in the empty gap separates the modes equally well; argmax takes the first.
    assert dark.max() - 1 / 256 <= tau < bright.min()
    assert reference.foreground_density(x, tau) == pytest.approx(0.3, abs=1e-3)


def test_otsu_two_values_by_hand():
    # Two values 0 and 1: every threshold between them separates perfectly; the first maximising
    # bin is bin 0, whose centre is 0.5/256.
    x = np.array([0.0] * 10 + [1.0] * 5)
    assert reference.otsu_threshold(x) == pytest.approx(0.5 / 256)
    assert reference.foreground_density(x) == pytest.approx(5 / 15)


def test_otsu_constant_image_is_an_error():
    with pytest.raises(ValueError, match="constant"):
        reference.otsu_threshold(np.full(10, 0.3))


@pytest.mark.parametrize("d, expected", [(0.1373, 58), (0.3602, 22)])
def test_paper_worked_numbers_grayscale(d, expected):
    assert reference.n_patches_grayscale(d, n_filters=32) == expected


@pytest.mark.parametrize("norm, expected", [(0.522, 27), (0.308, 16)])
def test_paper_worked_numbers_color(norm, expected):
    assert reference.n_patches_color(norm, n_filters=32) == expected


def test_kaiming_parity_bound():
    assert reference.kaiming_parity_scale(3, 3) == pytest.approx(0.272, abs=5e-4)
    assert reference.kaiming_parity_scale(1, (3, 5)) == pytest.approx(math.sqrt(2 / 15))


def test_mean_patch_norm_by_hand():
    # One 1×1×2×2 image [[0, 1], [0, 1]], K = 2: one patch, centred ±0.5 → norm sqrt(4·0.25) = 1.
    x = np.array([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert reference.mean_patch_norm(x, patch_size=2) == pytest.approx(1.0)


def test_extract_patches_explicit_positions():
    img = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    p = reference.extract_patches(img, 2, 0, positions=[(1, 2, 1), (0, 0, 0)])
    np.testing.assert_array_equal(p[0], [25, 26, 29, 30])
    np.testing.assert_array_equal(p[1], [0, 1, 4, 5])


def test_conditioned_init_std_equals_scale_and_rest_untouched():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, padding=1)

    net = Net()
    before = net.conv1.weight.detach().clone()
    rng = np.random.default_rng(1)
    images = torch.tensor(rng.random((16, 1, 12, 12)), dtype=torch.float32)
    reference.conditioned_init(net, images, n_clusters=16, n_patches=10, scale=0.2)
    w = net.conv1.weight.detach().numpy()
    assert np.std(w[:16]) == pytest.approx(0.2, rel=1e-5)
    np.testing.assert_array_equal(w[16:], before[16:].numpy())


def test_weight_and_normalise_std():
    c = np.random.default_rng(0).normal(size=(16, 27))
    out = reference.weight_and_normalise(c, 3, 3, 0.25)
    assert np.std(out) == pytest.approx(0.25, rel=1e-6)
