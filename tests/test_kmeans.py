"""prewarm_gpu.MiniBatchKMeans: toy cases by hand, properties, and scikit-learn cross-checks."""

import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans as SkMiniBatchKMeans

import reference
from prewarm_gpu import MiniBatchKMeans
from prewarm_gpu.kmeans import _fixed_run


def test_two_point_clusters_by_hand():
    # Batches are drawn with replacement, so use clusters of identical points: the centres are
    # then exact whatever is drawn, and the inertia is 0.
    X = torch.tensor([[0.0, 0.0]] * 3 + [[10.0, 1.0]] * 3)
    km = MiniBatchKMeans(2, random_state=0).fit(X)
    centres = sorted(km.cluster_centers_.tolist())
    assert centres == [[0.0, 0.0], [10.0, 1.0]]
    assert km.inertia_ == 0.0
    assert len(set(km.labels_[:3].tolist())) == 1 and km.labels_[0] != km.labels_[3]
    torch.testing.assert_close(km.predict(X), km.labels_)


def test_first_update_replaces_centre_with_batch_mean():
    # One step from given centres: each centre with points becomes the mean of its points.
    X = torch.tensor([[0.0], [1.0], [2.0], [10.0], [12.0]])
    c0 = torch.tensor([[0.5], [11.0], [100.0]])
    c, steps = _fixed_run(X, c0, torch.arange(5)[None])
    assert steps == 1
    torch.testing.assert_close(c, torch.tensor([[1.0], [11.0], [100.0]]))


def test_count_weighted_update_second_step_by_hand():
    # Step 1 on [0, 0]: c = 0, count 2. Step 2 on [4, 4]: c = (0·2 + 8) / 4 = 2.
    X = torch.tensor([[0.0], [4.0]])
    c, _ = _fixed_run(X, torch.tensor([[1.0]]), torch.tensor([[0, 0], [1, 1]]))
    torch.testing.assert_close(c, torch.tensor([[2.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_kept(dtype):
    X = torch.randn(500, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    km = MiniBatchKMeans(3, random_state=0).fit(X)
    assert km.cluster_centers_.dtype == dtype


def test_same_seed_bit_identical_and_generator_accepted():
    X = torch.randn(3000, 9, generator=torch.Generator().manual_seed(1))
    a = MiniBatchKMeans(8, random_state=5).fit(X)
    b = MiniBatchKMeans(8, random_state=torch.Generator().manual_seed(5)).fit(X)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert a.n_steps_ == b.n_steps_


def test_does_not_touch_global_rng():
    X = torch.randn(2000, 9, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    MiniBatchKMeans(8, random_state=0).fit(X)
    assert torch.equal(state, torch.get_rng_state())


def test_host_and_device_loops_agree_on_cpu():
    # The device loop (masked, host check every few steps) runs the same algorithm.
    X = torch.randn(4000, 9, generator=torch.Generator().manual_seed(2))
    a = MiniBatchKMeans(8, random_state=3, reassignment_ratio=0.0, sync_every=1).fit(X)
    b = MiniBatchKMeans(8, random_state=3, reassignment_ratio=0.0, sync_every=7).fit(X)
    assert a.n_steps_ == b.n_steps_
    torch.testing.assert_close(a.cluster_centers_, b.cluster_centers_, rtol=0, atol=1e-5)


def test_reassignment_moves_starved_centre_in_both_loops():
    # A centre far from all data gets no points; it is moved onto a batch point.
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 2, generator=gen)
    c0 = torch.cat([X[:3], torch.tensor([[1e3, 1e3]])])
    idx = torch.randint(0, 2048, (3, 512), generator=gen)
    for sync_every in (1, 2):
        c, _ = _fixed_run(X, c0, idx, reassignment_ratio=0.01, sync_every=sync_every)
        assert c[3].abs().max() < 100, sync_every


def test_inertia_never_rises_with_more_clusters_on_digits(digits_images):
    X = torch.nn.functional.unfold(digits_images, 3).transpose(1, 2).reshape(-1, 9)[::5]
    inertias = [MiniBatchKMeans(k, random_state=0).fit(X).inertia_ for k in (2, 8, 32)]
    assert inertias[0] > inertias[1] > inertias[2]


@pytest.mark.parametrize(
    "X, kwargs, match",
    [
        (torch.zeros(10), {}, "2-D"),
        (torch.zeros(3, 2), {}, "n_samples=3 should be >= n_clusters=4"),
        (torch.tensor([[0.0, float("nan")]] * 8), {}, "NaN"),
        (torch.zeros(10, 2), {"n_init": 0}, "n_init"),
    ],
)
def test_bad_input(X, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MiniBatchKMeans(4, **kwargs).fit(X)


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="not fitted"):
        MiniBatchKMeans(2).predict(torch.zeros(3, 2))


# ----------------------------------------------------------------- cross-checks (c) and (d)
@pytest.mark.parametrize("d", [9, 27])
def test_fixed_run_matches_sklearn_centres(d):
    """(c) Same initial centres, same batch indices, fixed length: centres within 1e-5."""
    rng = np.random.default_rng(d)
    X = rng.normal(size=(6000, d)).astype(np.float32)
    X -= X.mean(1, keepdims=True)
    c0 = X[rng.choice(len(X), 16, replace=False)]
    idx = rng.integers(0, len(X), size=(40, 1024))
    ref_c, _, _ = reference.minibatch_kmeans_fixed(X, c0, idx)
    for sync_every in (1, 8):
        c, steps = _fixed_run(torch.from_numpy(X), torch.from_numpy(c0), torch.from_numpy(idx),
                              sync_every=sync_every)
        assert steps == 40
        np.testing.assert_allclose(c.numpy(), ref_c, rtol=0, atol=1e-5)


def _digits_patches(digits_images, n_patches=8, seed=0):
    from prewarm_gpu.prewarm import extract_patches

    p = extract_patches(digits_images, 3, n_patches, generator=seed)
    return p - p.mean(1, keepdim=True)


def test_inertia_and_steps_in_distribution_with_sklearn(digits_images):
    """(d) 20 seeds on real patches: mean inertia within 1 %, n_steps_ distributions close."""
    from scipy.stats import mannwhitneyu

    X = _digits_patches(digits_images)  # 14376 real mean-centred 3×3 patches
    Xn = X.numpy()
    ours, theirs, s_ours, s_theirs = [], [], [], []
    for seed in range(20):
        km = MiniBatchKMeans(16, n_init=3, random_state=seed).fit(X)
        sk = SkMiniBatchKMeans(16, n_init=3, random_state=seed).fit(Xn)
        ours.append(km.inertia_)
        theirs.append(sk.inertia_)
        s_ours.append(km.n_steps_)
        s_theirs.append(sk.n_steps_)
    assert abs(np.mean(ours) / np.mean(theirs) - 1) < 0.01, (np.mean(ours), np.mean(theirs))
    assert mannwhitneyu(s_ours, s_theirs).pvalue > 0.01, (s_ours, s_theirs)
    assert abs(np.median(s_ours) - np.median(s_theirs)) <= 0.5 * np.median(s_theirs)


def test_direct_difference_branch_agrees_with_cpu_expression():
    # CUDA labels by direct differences and seeds k-means++ with them; check on the CPU that both
    # expressions give the same labels and (to rounding) the same seeding distances.
    from prewarm_gpu.kmeans import _labels, _pp_dists, _sq_dists

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 500, 27, generator=gen)
    c = torch.randn(3, 4, 27, generator=gen)
    torch.testing.assert_close(_pp_dists(x, x.square().sum(-1), c, c.square().sum(-1)),
                               _sq_dists(c, x),
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(_labels(x[0], c[0]), _sq_dists(x[0], c[0]).argmin(1))


def test_cluster_sums_one_hot_product_matches_index_add():
    # The CUDA branch (float64 one-hot product: deterministic, unlike atomics) checked on the CPU.
    from prewarm_gpu.kmeans import _cluster_sums

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 27, generator=gen)
    labels = torch.randint(0, 16, (1024,), generator=gen)
    labels[labels == 5] = 6  # an empty cluster sums to 0
    a = _cluster_sums(labels, x, 16, by_product=False)
    b = _cluster_sums(labels, x, 16, by_product=True)
    assert b.dtype == x.dtype and not b[5].any()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    exact = torch.stack([x[labels == j].double().sum(0) for j in range(16)]).float()
    torch.testing.assert_close(b, exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sync_every": -1}, "sync_every"),
        ({"sync_every": 2.5}, "sync_every"),
        ({"max_no_improvement": "a"}, "max_no_improvement"),
        ({"reassignment_ratio": "x"}, "reassignment_ratio"),
        ({"tol": float("nan")}, "tol"),
        ({"init_size": 0}, "init_size"),
    ],
)
def test_bad_parameters_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MiniBatchKMeans(3, **kwargs).fit(torch.randn(500, 4))


def test_numpy_int_parameters_and_empty_predict():
    X = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    a = MiniBatchKMeans(np.int64(3), n_init=np.int64(2), random_state=0).fit(X)
    b = MiniBatchKMeans(3, n_init=2, random_state=0).fit(X)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert a.predict(torch.empty(0, 4)).shape == (0,)


def test_accelerator_branches_end_to_end_on_cpu(monkeypatch, digits_images):
    # Every branch CUDA takes (direct-difference labels and seeding, one-hot cluster sums, the
    # masked device loop with a host check every 16 steps), run on the CPU: deterministic, and in
    # distribution with the CPU's own branches (this machine has no GPU; see the gpu tests).
    from prewarm_gpu import kmeans

    X = _digits_patches(digits_images)
    host = [MiniBatchKMeans(16, random_state=s).fit(X) for s in range(8)]
    monkeypatch.setattr(kmeans, "_CPU_PATHS", False)
    dev = [MiniBatchKMeans(16, random_state=s).fit(X) for s in range(8)]
    again = MiniBatchKMeans(16, random_state=0).fit(X)
    assert torch.equal(again.cluster_centers_, dev[0].cluster_centers_)
    assert again.n_steps_ == dev[0].n_steps_
    # The host-decided loop with the accelerator's cluster sums (sync_every=1 on a GPU).
    h1 = [MiniBatchKMeans(16, random_state=0, sync_every=1).fit(X) for _ in range(2)]
    assert torch.equal(h1[0].cluster_centers_, h1[1].cluster_centers_)
    h = np.mean([k.inertia_ for k in host])
    d = np.mean([k.inertia_ for k in dev])
    assert abs(d / h - 1) < 0.02, (d, h)
    assert abs(h1[0].inertia_ / h - 1) < 0.05, (h1[0].inertia_, h)  # one run, not a mean
    for k in dev:
        assert 2 <= k.n_steps_ <= (100 * X.shape[0]) // 1024
        assert k.labels_.shape == (X.shape[0],) and k.cluster_centers_.shape == (16, 9)
