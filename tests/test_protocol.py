"""Issue 25: the dataset rule, the schedule's length, pooled replications, data fingerprints."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from prewarm_gpu import cli, rules
from prewarm_gpu.data import load_dataset
from prewarm_gpu.experiment import RunSpec, SweepConfig, engine, plan_runs, read_results, units
from prewarm_gpu.experiment.datarule import dataset_rule
from prewarm_gpu.experiment.grid import GridConfig, render_grid, summarise_grid
from prewarm_gpu.experiment.pool import PoolError, pool
from prewarm_gpu.train import TrainConfig, cosine_lr, train
from tests.conftest import run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def tiny(out, **kw):
    base = dict(datasets=["digits"], seeds=[42, 7, 13], out=out, steps=8, loss_points=4,
                eval_points=2, progress=False)
    base.update(kw)
    return SweepConfig(**base)


# --- keys ----------------------------------------------------------------------------------------

def test_the_committed_kaiming_key_is_unchanged():
    # results/fashion-mnist/results.jsonl, seed 42: --resume must keep reusing it
    spec = RunSpec("fashion-mnist", "simplecnn", "kaiming", 42, (),
                   TrainConfig(steps=5000, lr_start=3e-3, lr_end=3e-5), "cpu", True, "fp32",
                   "torch-default")
    assert spec.key == "fashion-mnist/simplecnn/kaiming/seed=42/b98be3227522"
    same_t = RunSpec(*[getattr(spec, f) for f in ("dataset", "arch", "init", "seed", "options")],
                     TrainConfig(steps=5000, lr_start=3e-3, lr_end=3e-5, schedule_steps=5000),
                     "cpu", True, "fp32", "torch-default")
    assert same_t.key == spec.key  # T = N is the old protocol: same key
    longer = SweepConfig(datasets=["fashion-mnist"], steps=500, schedule_steps=5000)
    assert longer.train_config("fashion-mnist").t_max == 5000
    spec500 = RunSpec("fashion-mnist", "simplecnn", "kaiming", 42, (),
                      longer.train_config("fashion-mnist"), "cpu", True)
    assert spec500.config["train"]["schedule_steps"] == 5000


def test_the_sweep_config_plans_the_committed_key(tmp_path):
    config = SweepConfig(datasets=["fashion-mnist"], seeds=[42], inits=["kaiming", "prewarm"],
                         out=tmp_path, batch=False, dataset_rules={"fashion-mnist": {
                             "source": "dataset", "rule": "otsu", "statistic": 0.3602,
                             "otsu_threshold": 0.3809}})
    kaiming, prewarm = plan_runs(config)
    assert kaiming.key == "fashion-mnist/simplecnn/kaiming/seed=42/b98be3227522"
    assert dict(prewarm.options) == {"n_patches": 22}  # ⌊8 / 0.3602⌋


# --- the dataset rule -----------------------------------------------------------------------------

def _striped(n: int, seed: int) -> torch.Tensor:
    """Images whose foreground fraction varies a lot from image to image, so batch rules vary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    rows = torch.randint(1, 8, (n,), generator=g)
    for i, r in enumerate(rows.tolist()):
        x[i, 0, :r] = 16
    return x


@pytest.fixture
def synthetic(monkeypatch):
    data = load_dataset("digits")
    n = data.train_x.shape[0]
    data.train_x = _striped(n, 0)
    data.__dict__.pop("fingerprint", None)
    monkeypatch.setattr(units, "load_dataset", lambda name, **k: data)
    return data


def test_every_prewarm_arm_gets_the_whole_splits_value_not_its_batchs(synthetic, tmp_path):
    d = rules.foreground_density(synthetic.raw(synthetic.train_x),
                                 threshold=rules.otsu_threshold(synthetic.raw(synthetic.train_x)))
    want = math.floor(8 / d)
    config, specs = engine.prepare(tiny(tmp_path, steps=2), plan_runs)
    pw = [s for s in specs if s.init == "prewarm"]
    assert [dict(s.options)["n_patches"] for s in pw] == [want] * 3
    assert config.dataset_rules["digits"]["statistic"] == pytest.approx(d)
    # the batch rule, on each seed's first 256 images, gives other values
    from prewarm_gpu.experiment import build_arm

    batch = plan_runs(tiny(tmp_path, steps=2, rule_source="batch"))
    got = {build_arm(s, synthetic)[1]["n_patches"] for s in batch if s.init == "prewarm"}
    assert got != {want}


def test_records_and_caption_say_the_rule_source_and_value(synthetic, tmp_path):
    table = run_sweep(tiny(tmp_path, steps=2, seeds=[42]), log=lambda s: None)
    recs = {r["init"]: r for r in read_results(tmp_path / "results.jsonl")}
    rule = dataset_rule(synthetic)
    n = math.floor(8 / rule["statistic"])
    assert recs["prewarm"]["config"]["options"] == {"n_patches": n}
    rep = recs["prewarm"]["init_report"]
    assert rep["rule_source"] == "dataset" and rep["n_patches"] == n
    assert rep["n_patches_from"] == (f"n_patches {n} from the dataset rule (Otsu τ* = "
                                     f"{rule['otsu_threshold']:.4f}, d = {rule['statistic']:.4f})")
    assert f"Pre-Warm's {rep['n_patches_from']}" in table
    assert "accuracy at step 2 of a 2-step cosine schedule" in table
    assert recs["kaiming"]["data_fingerprint"] == recs["prewarm"]["data_fingerprint"] \
        == synthetic.fingerprint


def test_the_batch_source_keeps_the_old_keys_and_says_so(synthetic, tmp_path):
    run_sweep(tiny(tmp_path, steps=2, seeds=[42], rule_source="batch"), log=lambda s: None)
    recs = {r["init"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert recs["prewarm"]["config"]["options"] == {}
    assert recs["prewarm"]["init_report"]["rule_source"] == "batch"
    assert recs["prewarm"]["init_report"]["rule"] == "otsu"  # auto on the batch


def test_grid_refuses_the_batch_source(tmp_path, capsys):
    assert cli.main(["grid", "--dataset", "digits", "--out", str(tmp_path), "--rule-source",
                     "batch", "--steps", "60", "--n-patches", "10"]) == 2
    assert "every grid cell gives n_patches" in capsys.readouterr().err


# --- the schedule's length ------------------------------------------------------------------------

def test_three_steps_of_a_six_step_schedule_use_its_first_learning_rates(digits, monkeypatch):
    seen = []
    orig = torch.optim.lr_scheduler.CosineAnnealingLR.step

    def step(self, *a, **k):
        seen.append(self.optimizer.param_groups[0]["lr"])  # the lr the step just used
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.lr_scheduler.CosineAnnealingLR, "step", step)
    from prewarm_gpu.models import build_model

    for T, steps in ((6, 3), (3, 3)):
        seen.clear()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)
            model = build_model("simplecnn", in_channels=1, n_classes=10, image_size=8)
        cfg = TrainConfig(steps=steps, eval_points=1, loss_points=1, schedule_steps=T)
        train(model, digits, cfg, seed=0)
        # step t (0-based) runs at η(t) of a T-step cosine; the first call is the constructor's
        used = seen[1:] if len(seen) > steps else seen
        np.testing.assert_allclose(used[:steps], [cosine_lr(t, T, 3e-3, 3e-5)
                                                  for t in range(steps)], rtol=1e-6)
    assert cosine_lr(2, 6, 3e-3, 3e-5) > cosine_lr(2, 3, 3e-3, 3e-5) * 2


def test_a_schedule_shorter_than_the_run_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="schedule_steps .* must be an int >= steps = 10"):
        TrainConfig(steps=10, schedule_steps=5)
    assert cli.main(["reproduce", "--steps", "10", "--schedule-steps", "5", "--out",
                     str(tmp_path)]) == 2
    assert "schedule_steps" in capsys.readouterr().err


def test_grid_md_names_the_reading():
    def text(T):
        config = GridConfig(datasets=["digits"], seeds=[1], steps=500, schedule_steps=T,
                            n_patches=[10], patch_size=[3], n_clusters=[16], scale=[0.2],
                            rule_n_patches=22)
        return render_grid(summarise_grid(config, [], []))

    assert "training loss L_500 at step 500 of a 500-step cosine schedule" in text(None)
    assert "training loss L_500 at step 500 of the 5000-step cosine schedule (stopped early" in \
        text(5000)


# --- data fingerprint -----------------------------------------------------------------------------

def test_the_fingerprint_follows_the_data_to_the_pixel():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("sha256:")
    c = load_dataset("digits")
    c.test_x = c.test_x.clone()
    c.test_x[5, 0, 3, 3] ^= 1  # one pixel of one test image
    assert c.fingerprint != a.fingerprint


# --- pooling --------------------------------------------------------------------------------------

def _folder(path: Path, pairs: dict[int, tuple[float, float]], steps=5000, device="cpu",
            commit="abc", fingerprint=None, baseline=None) -> Path:
    path.mkdir(parents=True)
    lines = []
    for seed, (m, k) in pairs.items():
        for init, acc in (("kaiming", k), ("prewarm", m)):
            config = {"dataset": "fashion-mnist", "arch": "simplecnn", "init": init,
                      "options": {}, "train": {"steps": steps, "batch_size": 256,
                                               "lr_start": 0.003, "lr_end": 3e-05,
                                               "eval_points": 10, "loss_points": 100,
                                               "aux_weight": 0.3},
                      "device_type": device, "channels_last": False, "precision": "fp32",
                      "protocol": 2}
            if baseline:
                config["baseline"] = baseline
            lines.append(json.dumps({
                "key": f"fashion-mnist/simplecnn/{init}/seed={seed}/{device}{steps}",
                "dataset": "fashion-mnist", "arch": "simplecnn", "init": init, "seed": seed,
                "config": config, "status": "ok", "accuracy": acc, "curves": {},
                "init_report": {}, "data_fingerprint": fingerprint,
                "env": {"device": device, "git_commit": commit}}))
    (path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return path


A = {1: (0.930, 0.926), 2: (0.929, 0.928), 3: (0.931, 0.925), 4: (0.926, 0.928)}
B = {1: (0.932, 0.927), 2: (0.928, 0.928), 3: (0.930, 0.926)}  # no seed 4


def test_pool_averages_per_seed_then_tests_by_hand(tmp_path):
    a = _folder(tmp_path / "cpu", A)
    b = _folder(tmp_path / "h100", B, device="cuda", commit="def", fingerprint="sha256:1")
    text = pool([a, b])
    # per seed: Δ1 = (0.004 + 0.005)/2, Δ2 = (0.001 + 0)/2, Δ3 = (0.006 + 0.004)/2, Δ4 = −0.002
    d = np.array([0.0045, 0.0005, 0.005, -0.002])
    t = d.mean() / (d.std(ddof=1) / 2)
    p = sps.t.sf(t, 3)
    row = next(ln for ln in text.splitlines() if ln.startswith("| **pooled by seed**"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[2] == "4" and cells[5] == f"{d.mean():+.4f}" and cells[6] == f"{p:.4f}"
    assert cells[7] == "3/4" and cells[9] == f"{d.std(ddof=1):.4f}"
    crit = sps.t.ppf(0.95, 3)
    power = sps.nct.sf(crit, 3, 0.0016 * 2 / d.std(ddof=1))
    assert cells[10] == f"{power:.2f}"
    # each replication's own row, and the allowed differences listed
    assert "| cpu | 4 |" in text and "| h100 | 3 |" in text
    assert "- device differs: cpu: cpu; h100: cuda" in text
    assert "- data_fingerprint differs: cpu: None; h100: sha256:1" in text
    assert "per seed: 1: 2, 2: 2, 3: 2, 4: 1" in text


@pytest.mark.parametrize("kw, field", [({"steps": 500}, "steps"),
                                       ({"baseline": "he-normal"}, "baseline")])
def test_pool_refuses_different_protocols(tmp_path, kw, field, capsys):
    a = _folder(tmp_path / "a", A)
    b = _folder(tmp_path / "b", B, **kw)
    with pytest.raises(PoolError, match=f"protocols differ in {field}"):
        pool([a, b])
    assert cli.main(["report", "--pool", str(a), str(b)]) == 2
    assert f"differ in {field}" in capsys.readouterr().err


def test_an_absent_baseline_field_is_the_default_baseline(tmp_path):
    a = _folder(tmp_path / "a", A, baseline="torch-default")
    b = _folder(tmp_path / "b", B)  # an older record: no baseline field
    assert "pooled by seed" in pool([a, b])


# the shared folder beside the checkout (main, or a worktree one level further down)
H100 = next((p / "shared" / "data" / "fashion-mnist-h100-2026-11-23"
             for p in (ROOT.parent, ROOT.parent.parent)
             if (p / "shared" / "data" / "fashion-mnist-h100-2026-11-23").is_dir()), None)


def _last_accuracies(folder: Path) -> dict[tuple[str, int], float]:
    """(init, seed) -> accuracy of the last ok record written, read straight from results.jsonl."""
    acc = {}
    for line in (folder / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["status"] == "ok":
            acc[(r["init"], r["seed"])] = r["accuracy"]
    return acc


@pytest.mark.skipif(H100 is None, reason="the H100 replication is not on this machine")
def test_pool_of_the_h100_replication_and_the_committed_run(capsys):
    folders = [H100, ROOT / "results" / "fashion-mnist"]
    assert cli.main(["report", "--pool", *map(str, folders)]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("| **pooled by seed**"))
    cells = [c.strip() for c in row.split("|")]
    # recomputed by hand from the two folders: each seed's paired difference averaged over the
    # replications, then the one-sided t-test over the 8 seeds
    accs = [_last_accuracies(f) for f in folders]
    seeds = sorted({s for a in accs for (_, s) in a})
    d = np.array([np.mean([a[("prewarm", s)] - a[("kaiming", s)] for a in accs]) for s in seeds])
    p = sps.ttest_1samp(d, 0.0, alternative="greater").pvalue
    assert cells[2] == str(len(seeds)) == "8"
    assert float(cells[5]) == pytest.approx(d.mean(), abs=5e-5)
    assert float(cells[6].rstrip("*")) == pytest.approx(p, abs=5e-5)
