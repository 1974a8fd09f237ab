"""prewarm_gpu.rules against the reference rules and hand-computed values; (f) of the issue."""

import math

import numpy as np
import pytest
import torch

import reference
from prewarm_gpu import checks, patches, rules


def test_otsu_matches_reference_on_digits(digits_images):
    ours = rules.otsu_threshold(digits_images)
    ref = reference.otsu_threshold(digits_images.numpy())
    assert abs(ours - ref) <= 1 / 256  # within one bin
    d_ours = rules.foreground_density(digits_images)
    d_ref = reference.foreground_density(digits_images.numpy())
    assert d_ours == pytest.approx(d_ref, abs=1e-12)


def test_otsu_paper_convention_mnist_like():
    # Pixels k/255 over [0, 1] with a dark mode and a bright mode: τ* is a bin centre (i + 0.5)/256.
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros(8000), rng.integers(100, 256, 2000)]) / 255.0
    tau = rules.otsu_threshold(torch.tensor(x))
    assert tau == pytest.approx(reference.otsu_threshold(x))
    assert (tau * 256 - 0.5) == pytest.approx(round(tau * 256 - 0.5))


def test_chunked_statistics_equal_whole(digits_images):
    chunks = list(digits_images.split(300))
    assert rules.otsu_threshold(chunks) == rules.otsu_threshold(digits_images)
    whole = rules.foreground_density(digits_images)
    assert rules.foreground_density(chunks) == pytest.approx(whole)
    assert rules.mean_patch_norm(chunks) == pytest.approx(rules.mean_patch_norm(digits_images),
                                                          rel=1e-9)


def test_uint8_is_scaled():
    x = torch.tensor([0, 0, 0, 255, 255], dtype=torch.uint8)
    assert rules.otsu_threshold(x) == pytest.approx(reference.otsu_threshold(x.numpy() / 255.0))


def test_constant_images_otsu_error():
    with pytest.raises(ValueError, match="constant"):
        rules.otsu_threshold(torch.full((2, 1, 4, 4), 0.5))


def test_mean_patch_norm_matches_reference_all_positions():
    x = torch.rand(3, 3, 7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rules.mean_patch_norm(x, 3) == pytest.approx(reference.mean_patch_norm(x.numpy(), 3),
                                                        rel=1e-12)


def test_mean_patch_norm_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert rules.mean_patch_norm(x, 2) == pytest.approx(1.0)


def test_mean_patch_norm_sampled_is_close_to_exact(digits_images):
    exact = rules.mean_patch_norm(digits_images)
    sampled = rules.mean_patch_norm(digits_images, n_patches=20, generator=0)
    assert sampled == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize("d", [0.1373, 0.3602, 0.05, 1.0, 0.77])
def test_n_patches_grayscale_equals_reference(d):
    assert rules.n_patches_grayscale(d) == reference.n_patches_grayscale(d)


@pytest.mark.parametrize("norm", [0.522, 0.308, 0.01, 1.3])
def test_n_patches_color_equals_reference(norm):
    assert rules.n_patches_color(norm) == reference.n_patches_color(norm)


def test_paper_worked_numbers():
    assert rules.n_patches_grayscale(0.1373, 32) == 58
    assert rules.n_patches_grayscale(0.3602, 32) == 22
    assert rules.n_patches_color(0.522, 32) == 27
    assert rules.n_patches_color(0.308, 32) == 16
    assert rules.kaiming_parity_scale(3, 3) == pytest.approx(0.2722, abs=1e-4)


def test_default_scale_capped_by_kaiming_parity():
    assert rules.default_scale(1, 3) == 0.20
    assert rules.default_scale(3, 3) == 0.25
    assert rules.default_scale(3, 7) == pytest.approx(math.sqrt(2 / 147))  # resnet conv1


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(bad):
    with pytest.raises(ValueError, match="density"):
        rules.n_patches_grayscale(bad)


@pytest.mark.gpu
def test_rules_on_cuda_match_cpu(digits_images):
    x = digits_images.cuda()
    assert rules.otsu_threshold(x) == rules.otsu_threshold(digits_images)
    assert rules.mean_patch_norm(x) == pytest.approx(rules.mean_patch_norm(digits_images), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite(dtype):
    big = torch.finfo(dtype).max
    assert checks.all_finite(torch.rand(4, 5).to(dtype))
    assert checks.all_finite(torch.full((8,), big, dtype=dtype))  # the sum overflows; values don't
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.rand(4, 5).to(dtype)
        x[2, 3] = bad
        assert not checks.all_finite(x), bad
    x = torch.full((8,), big, dtype=dtype)
    x[0], x[1] = float("inf"), -float("inf")  # inf + -inf: the sum is NaN either way
    assert not checks.all_finite(x)


@pytest.mark.parametrize("patch", [1, 2, 3, (3, 5), (7, 7)])
def test_window_norms_equal_explicit_patches(patch):
    # The every-position statistic without patches (window sums of Σx and Σx²) equals the norms
    # of the unfolded, mean-centred patches; below 1e-7 for constant patches (float64
    # cancellation leaves ~1e-8, not exactly 0).
    kh, kw = checks.as_pair(patch)
    x = torch.rand(4, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    x[0] = 0.37  # a constant image: every patch has norm 0
    cols = torch.nn.functional.unfold(x.double(), (kh, kw)).transpose(1, 2)
    want = torch.linalg.vector_norm(cols - cols.mean(-1, keepdim=True), dim=-1)
    got = patches.window_norms(x, kh, kw).reshape(4, -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert float(got[0].max()) < 1e-7
