"""Clustered filters of trained models (Ulm et al.): bank build/save/load, sampling, fourier."""

import math

import pytest
import torch
from torch import nn

from prewarm_gpu.experiment.records import build_bank_from_runs
from prewarm_gpu.initializers import get
from prewarm_gpu.methods import filterbank as fb


class Net(nn.Module):
    def __init__(self, seed=0, k2=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(2, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, k2)
        self.skip = nn.Conv2d(2, 16, 1)  # 1×1: never banked
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def bank():
    return fb.build_bank([Net(1).state_dict(), Net(2).state_dict()], n_clusters=3, generator=0)


def _nearest_distance(slices, centres):
    return torch.cdist(slices.flatten(1).double(), centres.flatten(1).double()).min(1).values


def test_bank_layout(bank):
    assert bank["n_models"] == 2 and bank["variant"] == "euclidean"
    assert sorted(bank["layers"]) == ["conv1", "conv2"]  # no 1×1 conv, no linear
    e = bank["layers"]["conv2"]
    assert e["centres"].shape == (3, 3, 3) and e["n_kernels"] == 2 * 16 * 8
    assert float(e["pdf"].sum()) == pytest.approx(1.0)


def test_every_slice_is_a_centre_drawn_by_cluster_size(bank, device):
    model = Net(3).to(device)
    before = _state(model)
    report = get("filterbank")(model, bank=bank, generator=0)
    assert report["filled"] == ["conv1", "conv2"] and report["unmatched"] == ["skip"]
    for name in ("conv1", "conv2"):
        w = model.get_submodule(name).weight.detach().reshape(-1, 3, 3).cpu()
        assert float(_nearest_distance(w, bank["layers"][name]["centres"]).max()) < 1e-6
    # Frequencies follow the pdf: 128 slices per layer here, so a loose bound.
    w = model.conv2.weight.detach().reshape(-1, 9).cpu().double()
    c = bank["layers"]["conv2"]["centres"].reshape(-1, 9).double()
    freq = torch.bincount(torch.cdist(w, c).argmin(1), minlength=3).double() / w.shape[0]
    assert float((freq - bank["layers"]["conv2"]["pdf"].double()).abs().max()) < 0.15
    for key in ("conv1.bias", "skip.weight", "fc.weight"):
        torch.testing.assert_close(model.state_dict()[key], before[key], rtol=0, atol=0)


def test_fourier_centres_are_point_symmetric(device):
    sds = [Net(s, k2=4).state_dict() for s in (1, 2)]
    bank = fb.build_bank(sds, n_clusters=4, variant="fourier", generator=0)
    for name, e in bank["layers"].items():
        c = e["centres"]
        # f[n] = f[-n mod N] per axis: flip, then roll by one.
        mirrored = torch.roll(c.flip(1, 2), shifts=(1, 1), dims=(1, 2))
        torch.testing.assert_close(c, mirrored, rtol=0, atol=1e-6, msg=name)
    euclid = fb.build_bank(sds, n_clusters=4, generator=0)["layers"]["conv1"]["centres"]
    assert not torch.allclose(euclid, torch.roll(euclid.flip(1, 2), (1, 1), (1, 2)))
    model = Net(5, k2=4).to(device)
    get("filterbank")(model, bank=bank, generator=0)


def test_fourier_is_euclidean_kmeans_on_the_even_parts():
    # Re fft2(w) is a scaled orthogonal map of w's even part, and k-means commutes with those.
    k = torch.randn(10, 5, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    even = (k + torch.roll(k.flip(2, 3), (1, 1), (2, 3))) / 2
    four = fb.build_bank([{"c.weight": k}], n_clusters=4, variant="fourier", generator=0)
    eucl = fb.build_bank([{"c.weight": even}], n_clusters=4, generator=0)
    for key in ("centres", "pdf"):
        torch.testing.assert_close(four["layers"]["c"][key], eucl["layers"]["c"][key],
                                   rtol=1e-5, atol=1e-5)


def test_match_he_and_determinism(bank, device):
    a, b = Net(3).to(device), Net(4).to(device)
    state = torch.random.get_rng_state()
    fb.filterbank_(a, bank, match_he=True, generator=7)
    fb.filterbank_(b, bank, match_he=True, generator=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a.conv2.weight, b.conv2.weight, rtol=0, atol=0)
    assert float(a.conv2.weight.detach().std(unbiased=False)) == pytest.approx(
        math.sqrt(2 / (8 * 9)), rel=1e-5)


def test_save_load_and_runs_folder(tmp_path, bank, device):
    path = tmp_path / "bank.pt"
    fb.save_bank(bank, path)
    loaded = fb.load_bank(path)
    torch.testing.assert_close(loaded["layers"]["conv1"]["centres"],
                               bank["layers"]["conv1"]["centres"])
    model = Net(3).to(device)
    assert get("filterbank")(model, bank=str(path), generator=0)["filled"] == ["conv1", "conv2"]

    models = tmp_path / "runs" / "models"
    models.mkdir(parents=True)
    for name, seed in (("fashion-mnist-kaiming-1", 1), ("fashion-mnist-kaiming-2", 2),
                       ("digits-kaiming-1", 3), ("fashion-mnist-gabor-1", 4)):
        torch.save(Net(seed).state_dict(), models / f"{name}.pt")
    runs = build_bank_from_runs(tmp_path / "runs", dataset="fashion-mnist", init="kaiming",
                                   n_clusters=2, generator=0)
    assert runs["n_models"] == 2
    assert runs["sources"] == ["fashion-mnist-kaiming-1.pt", "fashion-mnist-kaiming-2.pt"]
    assert build_bank_from_runs(tmp_path / "runs", n_clusters=2, generator=0)["n_models"] == 4
    with pytest.raises(ValueError, match="no trained models"):
        build_bank_from_runs(tmp_path / "runs", dataset="cifar10")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"format": fb.FORMAT, "layers": {}}, "empty"),
        ({"layers": {"conv1": {}}}, "not a filter bank"),
        (None, "needs bank="),
    ],
)
def test_bad_bank_leaves_model_unchanged(bad, match):
    model = Net(3)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        get("filterbank")(model, bank=bad, generator=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_no_matching_layer(bank):
    other = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 5))
    with pytest.raises(ValueError, match="no Conv2d .* matches the bank"):
        fb.filterbank_(other, bank)
    wrong_size = Net(3, k2=5)
    assert fb.filterbank_(wrong_size, bank, generator=0)["unmatched"] == ["conv2", "skip"]


def test_build_errors():
    with pytest.raises(ValueError, match="at least one"):
        fb.build_bank([])
    with pytest.raises(ValueError, match="different kernel sizes"):
        fb.build_bank([Net(1).state_dict(), Net(2, k2=5).state_dict()])
    with pytest.raises(ValueError, match="should be >= n_clusters"):
        fb.build_bank([Net(1).state_dict()], n_clusters=200)
    with pytest.raises(ValueError, match="variant"):
        fb.build_bank([Net(1).state_dict()], variant="cosine")
    with pytest.raises(ValueError, match="no conv layer"):
        fb.build_bank([nn.Linear(3, 3).state_dict()])
