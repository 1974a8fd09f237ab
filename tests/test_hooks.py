"""prewarm_on_first_batch: Pre-Warm at the first forward call of a loop it was not written for."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prewarm_gpu import prewarm_, prewarm_on_first_batch

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
K = 8  # 16 filters: [0, 8) conditioned


def small(seed: int = 0) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def raw_data(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def standardise(raw: torch.Tensor) -> torch.Tensor:
    return (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train(model: nn.Module, images: torch.Tensor, steps: int = 3, batch_size: int = 8):
    """A plain loop over a DataLoader, as a user writes it; the model outputs of each step."""
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outputs = []
    for _, (x, _y) in zip(range(steps), loader, strict=False):
        out = model(x)
        outputs.append(out.detach())
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
    return outputs


def test_runs_once_on_the_first_batch_before_its_forward():
    raw = raw_data()
    model, ref = small(), small()
    handle = prewarm_on_first_batch(model, generator=0)
    assert handle.pending and handle.report is None
    outputs = train(model, raw)
    want = prewarm_(ref, raw[:8], generator=0)  # the loader's first batch
    torch.testing.assert_close(outputs[0], ref(raw[:8]), rtol=0, atol=0)  # forward saw it
    assert not handle.pending and len(model._forward_pre_hooks) == 0
    r = handle.report.as_dict()
    assert r["sync"] == "local"
    assert {k: r[k] for k in ("n_patches", "rule", "inertia", "scale")} == \
        {k: want.as_dict()[k] for k in ("n_patches", "rule", "inertia", "scale")}


def test_mean_std_give_the_rules_raw_pixels():
    raw = raw_data()
    model, ref = small(), small()
    handle = prewarm_on_first_batch(model, mean=MEAN, std=STD, generator=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not raw [0, 1] pixels" warning
        outputs = train(model, standardise(raw))
    want = prewarm_(ref, standardise(raw[:8]), raw_images=raw[:8], generator=0)
    assert handle.report.n_patches == want.n_patches
    assert handle.report.statistic == pytest.approx(want.statistic, rel=1e-6)
    torch.testing.assert_close(outputs[0], ref(standardise(raw[:8])), rtol=1e-5, atol=1e-6)


def test_without_raw_pixels_prewarm_warns_and_n_patches_or_raw_images_silence_it():
    x = standardise(raw_data())
    with pytest.warns(UserWarning, match="not raw"):
        prewarm_on_first_batch(model := small(), generator=0)
        model(x[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = prewarm_on_first_batch(model := small(), n_patches=5, generator=0)
        model(x[:8])
        assert (h.report.rule, h.report.n_patches) == ("given", 5)
        h = prewarm_on_first_batch(model := small(), raw_images=raw_data(), generator=0)
        model(x[:8])
        assert h.report.rule == "patch_norm"


def test_remove_before_the_first_batch_leaves_the_model_alone():
    model = small()
    before = model[0].weight.detach().clone()
    handle = prewarm_on_first_batch(model, generator=0)
    handle.remove()
    handle.remove()  # idempotent
    model(raw_data(4))
    assert handle.report is None and torch.equal(model[0].weight, before)


def test_a_failure_raises_from_the_forward_and_disarms():
    model = small()
    before = model[0].weight.detach().clone()
    handle = prewarm_on_first_batch(model, n_clusters=99, generator=0)
    with pytest.raises(ValueError, match="n_clusters"):
        model(raw_data(4))
    assert isinstance(handle.error, ValueError) and not handle.pending
    model(raw_data(4))  # the loop may go on: no retry on every batch
    assert torch.equal(model[0].weight, before)


def test_input_picks_a_keyword_argument():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small()

        def forward(self, mask, *, images):
            return self.net(images) * mask

    model = Keyword()
    handle = prewarm_on_first_batch(model, input="images", generator=0)
    model(torch.ones(1), images=raw_data(8))
    assert handle.report.layer == "net.0"
    other = Keyword()
    prewarm_on_first_batch(other, input="pixels")
    with pytest.raises(ValueError, match="no keyword argument 'pixels'"):
        other(torch.ones(1), images=raw_data(8))


@pytest.mark.parametrize("when", ["before compiling", "after compiling", "after the first call"])
def test_torch_compile(when):
    """The hook in a compiled model's loop (backend="eager", torch 2.14 on the CPU): it runs
    eagerly (torch.compiler.disable) whenever it is installed."""
    raw = raw_data()
    model, ref = small(), small()
    prewarm_(ref, raw[8:16], generator=0)  # the batch of the first call after installing
    if when == "before compiling":
        handle = prewarm_on_first_batch(model, generator=0)
        compiled = torch.compile(model, backend="eager")
    else:
        compiled = torch.compile(model, backend="eager")
        if when == "after the first call":
            compiled(raw[:8])
        handle = prewarm_on_first_batch(compiled, generator=0)
    out = compiled(raw[8:16])
    assert handle.report is not None and not handle.pending
    torch.testing.assert_close(out, ref(raw[8:16]), rtol=1e-6, atol=1e-6)
    compiled(raw[16:24])  # a removed hook must not run again
    torch.testing.assert_close(model[0].weight, ref[0].weight, rtol=0, atol=0)


def test_under_ddp_every_rank_trains_rank0s_filters(tmp_path):
    from test_distributed import run_ranks

    r0, r1 = (r["hook"] for r in run_ranks("hook", tmp_path))
    for r in (r0, r1):
        assert (r["report"]["sync"], r["report"]["src"], r["hooks_left"]) == ("broadcast", 0, 0)
        assert not torch.equal(r["after_first"]["0.weight"], r["initial"]["0.weight"])
    for key in r0["final"]:  # each rank its own batches, yet the replicas never diverge
        torch.testing.assert_close(r0["after_first"][key], r1["after_first"][key], rtol=0, atol=0)
        torch.testing.assert_close(r0["final"][key], r1["final"][key], rtol=0, atol=0)


def test_bad_options_are_refused_at_install():
    with pytest.raises(ValueError, match="mean and std together"):
        prewarm_on_first_batch(small(), mean=MEAN)
    with pytest.raises(ValueError, match="raw_images or mean/std"):
        prewarm_on_first_batch(small(), mean=MEAN, std=STD, raw_images=raw_data())
    with pytest.raises(ValueError, match="std must be > 0"):
        prewarm_on_first_batch(small(), mean=MEAN, std=(0.2, 0.0, 0.3))
    with pytest.raises(ValueError, match="mean has 3 channels but std has 2"):
        prewarm_on_first_batch(small(), mean=MEAN, std=(0.2, 0.3))
    with pytest.raises(TypeError, match=r"unknown options \['n_cluster'\]"):
        prewarm_on_first_batch(small(), n_cluster=3)
    with pytest.raises(ValueError, match="sync must be one of"):
        prewarm_on_first_batch(small(), sync="all")
    with pytest.raises(ValueError, match="DataParallel"):
        prewarm_on_first_batch(nn.DataParallel(small()))


def test_bad_batches_are_named_at_the_first_forward():
    model = small()
    prewarm_on_first_batch(model, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="mean/std have 2 channels"):
        model(raw_data(4))
    model = small()
    prewarm_on_first_batch(model, input=1)
    with pytest.raises(ValueError, match="no argument 1"):
        model(raw_data(4))
