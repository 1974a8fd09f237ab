"""The batched trainer equals the single-run trainer (issue 5's equivalence)."""

import copy

import pytest
import torch

from prewarm_gpu import prewarm_
from prewarm_gpu.models import SimpleCNN
from prewarm_gpu.train import TrainConfig, evaluate, train, train_batched


def _models(digits, seeds):
    """One Kaiming and one Pre-Warm model per seed (different initial weights per run)."""
    out = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)  # the CPU generator alone
            m = SimpleCNN(1, 10, 8)
        pw = copy.deepcopy(m)
        prewarm_(pw, digits.standardise(digits.train_x[:256]),
                 raw_images=digits.raw(digits.train_x), generator=s)
        out += [m, pw]
    return out, [s for s in seeds for _ in range(2)]


def _compare(digits, dtype, backend="auto", channels_last=False):
    cfg = TrainConfig(steps=60, lr_start=3e-3, lr_end=3e-5, eval_points=2, loss_points=60)
    models, seeds = _models(digits, [42])  # a Kaiming and a Pre-Warm run
    models = [m.to(dtype) for m in models]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    singles = [copy.deepcopy(m).to(memory_format=fmt) for m in models]
    batched = train_batched(models, digits, cfg, seeds=seeds, backend=backend)
    pairs = []
    for m, s, b in zip(singles, seeds, batched, strict=True):
        r = train(m, digits, cfg, seed=s)
        assert r.status == b.status == "ok"
        pairs.append((torch.tensor(b.loss), torch.tensor(r.loss), b.accuracy, r.accuracy))
    return models, singles, pairs


@pytest.mark.parametrize("backend", ["grouped", "vmap", "loop"])
def test_batched_equals_single_run_exactly_in_float64(digits, backend):
    """The same algorithm: in float64 every per-run loss curve and accuracy is the single run's.

    (Losses are logged in float32, hence 1e-6.) A coupling between runs, a shared BatchNorm
    statistic or a wrong data order would show here as differences of order 1e-2.
    """
    data64 = copy.copy(digits)
    data64._a, data64._b = digits._a.double(), digits._b.double()  # standardise in float64
    models, singles, pairs = _compare(data64, torch.float64, backend)
    for b_loss, r_loss, b_acc, r_acc in pairs:
        torch.testing.assert_close(b_loss, r_loss, rtol=0, atol=1e-6)
        assert b_acc == r_acc
    # Trained weights and BatchNorm buffers were written back into each model.
    for m, (_, _, b_acc, _) in zip(models, pairs, strict=True):
        assert evaluate(m, data64) == b_acc


def test_cpu_default_backend_matches_single_run_fp32_within_issue_tolerance(digits):
    """fp32, the CPU default (``loop``: each run's own kernels, channels_last like the harness's
    single-run trainer): losses within 1e-4 over the first 50 steps, accuracies within 0.1 points.
    (Measured: ≤ 2.4e-7, accuracies identical.)"""
    _, _, pairs = _compare(digits, torch.float32, "auto", channels_last=True)
    for b_loss, r_loss, b_acc, r_acc in pairs:
        torch.testing.assert_close(b_loss[:50], r_loss[:50], rtol=0, atol=1e-4)
        assert abs(b_acc - r_acc) <= 0.001


def test_grouped_backend_matches_single_run_fp32(digits):
    """fp32, grouped convolutions (the GPU default): equal to rounding at first, then Adam
    amplifies the different summation order of grouped kernels.

    Measured: the single-run trainer against *itself* with 1 instead of 2 threads differs by
    1.5e-4 by step 50 here, so the issue's 1e-4 is below fp32's floor for any change of kernels.
    We assert the first 8 steps within 1e-4 (measured ≤ 4.5e-5), all 50 within 1e-3 (measured
    ≤ 4.5e-4), and final accuracies within one test image (1/360); float64 (above) is exact.
    """
    _, _, pairs = _compare(digits, torch.float32, "grouped")
    for b_loss, r_loss, b_acc, r_acc in pairs:
        torch.testing.assert_close(b_loss[:8], r_loss[:8], rtol=0, atol=1e-4)
        torch.testing.assert_close(b_loss[:50], r_loss[:50], rtol=0, atol=1e-3)
        assert abs(b_acc - r_acc) <= 1 / 360 + 1e-12


def test_nan_run_fails_alone(digits):
    cfg = TrainConfig(steps=20, eval_points=1, loss_points=10)
    models, seeds = _models(digits, [1])
    with torch.no_grad():
        models[0].fc2.weight.fill_(float("nan"))
    res = train_batched(models, digits, cfg, seeds=seeds)
    assert res[0].status == "failed" and res[0].failed_step == 1 and res[0].accuracy is None
    assert res[1].status == "ok" and res[1].accuracy > 0.1


def test_bad_input(digits):
    cfg = TrainConfig(steps=2)
    with pytest.raises(ValueError, match="one seed per run"):
        train_batched([SimpleCNN(1, 10, 8)], digits, cfg, seeds=[1, 2])
    with pytest.raises(ValueError, match="one architecture"):
        train_batched([SimpleCNN(1, 10, 8), SimpleCNN(1, 5, 8)], digits, cfg, seeds=[1, 2])
    with pytest.raises(ValueError, match="backend"):
        train_batched([SimpleCNN(1, 10, 8)], digits, cfg, seeds=[1], backend="magic")
    with pytest.raises(ValueError, match="precision"):
        train_batched([SimpleCNN(1, 10, 8)], digits, cfg, seeds=[1], precision="fp8")


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_reduced_precisions_train(digits, precision):
    # bf16 autocast (CPU autocast here; BatchNorm parameters and the loss stay fp32) and the TF32
    # flag (a no-op on the CPU) still learn the task.
    cfg = TrainConfig(steps=40, eval_points=1, loss_points=4)
    models, seeds = _models(digits, [3])
    res = train_batched(models, digits, cfg, seeds=seeds, precision=precision, backend="grouped")
    assert all(r.status == "ok" and r.accuracy > 0.5 for r in res), res
    assert all(p.dtype == torch.float32 for m in models for p in m.parameters())
