"""``prewarm-gpu grid`` (§4.3): planning, the metric, per-cell statistics recomputed by hand from
the results file, resume, the command line."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from prewarm_gpu import cli
from prewarm_gpu.experiment import engine, read_results, units
from prewarm_gpu.experiment.grid import (
    LOSS_WINDOW,
    GridConfig,
    cell_stats,
    cells,
    loss_at_end,
    plan_grid,
    prepare_grid,
)
from tests.conftest import interrupt_after, run_grid

pytestmark = pytest.mark.usefixtures("one_thread", "cached_digits")


def small(out: Path, **kw) -> GridConfig:
    base = dict(datasets=["digits"], seeds=[1, 2, 3], out=out, steps=LOSS_WINDOW + 2,
                patch_size=[3], n_clusters=[16], n_patches=[10, 25], scale=[0.2],
                rule_n_patches=25, progress=False)
    base.update(kw)
    return GridConfig(**base)


def test_the_default_grid_is_the_papers():
    c = GridConfig()
    assert (c.patch_size, c.n_clusters, c.n_patches, c.scale) == (
        [3, 5], [8, 16, 32, 64], [10, 15, 20, 25, 30, 50, 100], [0.05, 0.1, 0.2, 0.3])
    assert len(cells(c)) == 224 and c.steps == 500 and c.datasets == ["fashion-mnist"]


def test_one_kaiming_run_per_seed_is_shared_by_every_cell():
    specs = plan_grid(small(Path("unused"), n_patches=[10, 20, 25], scale=[0.1, 0.2]))
    kaiming = [s for s in specs if s.init == "kaiming"]
    assert [s.seed for s in kaiming] == [1, 2, 3]
    prewarm = [s for s in specs if s.init == "prewarm"]
    assert len(prewarm) == 3 * 6 and len({s.key for s in prewarm}) == 18
    assert {dict(s.options)["n_patches"] for s in prewarm} == {10, 20, 25}
    assert all(s.train.loss_points == s.train.steps for s in specs)  # every step's loss stored


def test_on_the_cpu_runs_train_one_at_a_time_unless_stacking_is_asked_for(tmp_path):
    config, specs = prepare_grid(small(tmp_path))
    assert config.batch is False and not any(s.channels_last is False for s in specs)
    assert engine._groups(specs, config.batch, config.group_size) == [[s] for s in specs]
    config, specs = prepare_grid(small(tmp_path, batch=True))
    assert config.group_size == 3  # Kaiming + 2 cells: one seed's runs
    groups = engine._groups(specs, config.batch, config.group_size)
    assert [[s.seed for s in g] for g in groups] == [[1] * 3, [2] * 3, [3] * 3]


def test_loss_at_end_is_the_mean_of_the_last_50_step_losses():
    n = 60
    rec = {"config": {"train": {"steps": n}},
           "curves": {"loss_steps": list(range(1, n + 1)), "loss": [float(s) for s in
                                                                    range(1, n + 1)]}}
    assert loss_at_end(rec) == pytest.approx(np.mean(range(11, 61)))  # steps 11..60
    rec["curves"]["loss_steps"] = rec["curves"]["loss_steps"][::2]  # coarser curve: undefined
    rec["curves"]["loss"] = rec["curves"]["loss"][::2]
    assert loss_at_end(rec) is None


def test_cell_stats_count_lower_loss_as_better_by_hand():
    kaiming = [0.50, 0.40, 0.30, 0.20]
    prewarm = [0.45, 0.41, 0.25, 0.10]  # better on 3 of 4
    s = cell_stats(prewarm, kaiming, "loss")
    d = np.subtract(prewarm, kaiming)  # [-0.05, 0.01, -0.05, -0.10]
    assert s["delta"] == pytest.approx(-0.0475) and s["wins"] == 3
    t = d.mean() / (d.std(ddof=1) / 2)
    assert s["t"] == pytest.approx(-t)  # the statistic of (Kaiming − Pre-Warm) > 0
    assert s["p"] == pytest.approx(sps.t.cdf(t, df=3))  # one-sided: Pre-Warm lower
    assert s["ci"][0] < s["delta"] < s["ci"][1] < 0.02
    acc = cell_stats([0.9, 0.8], [0.8, 0.85], "accuracy")
    assert acc["delta"] == pytest.approx(0.025) and acc["wins"] == 1


def test_a_small_grid_recomputed_from_its_results_file(tmp_path):
    outcome = run_grid(small(tmp_path))
    grid = json.loads((tmp_path / "grid.json").read_text())
    recs = read_results(tmp_path / "results.jsonl")
    assert len(recs) == 9 and all(r["status"] == "ok" for r in recs)
    kaiming = {r["seed"]: r for r in recs if r["init"] == "kaiming"}
    ps = []
    for cell in grid["cells"]:
        mine = {r["seed"]: r for r in recs if r["init"] == "prewarm"
                and r["config"]["options"]["n_patches"] == cell["n_patches"]}
        m = [np.mean(mine[s]["curves"]["loss"][-LOSS_WINDOW:]) for s in (1, 2, 3)]
        k = [np.mean(kaiming[s]["curves"]["loss"][-LOSS_WINDOW:]) for s in (1, 2, 3)]
        assert cell["prewarm"] == pytest.approx(m) and cell["kaiming"] == pytest.approx(k)
        assert cell["delta"] == pytest.approx(np.mean(np.subtract(m, k)))
        p = sps.ttest_rel(m, k, alternative="less").pvalue
        assert cell["p"] == pytest.approx(p)
        assert cell["wins"] == sum(a < b for a, b in zip(m, k, strict=True))
        ps.append(p)
    lo, hi = sorted(ps)  # Holm over two cells by hand
    holm = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), min(1, hi))}
    assert [c["p_holm"] for c in grid["cells"]] == pytest.approx([holm[p] for p in ps])
    md = (tmp_path / "grid.md").read_text()
    assert "| 3 | 16 | 25 ◀ rule | 0.2 | 3 |" in md and "| 3 | 16 | 10 | 0.2 | 3 |" in md
    assert outcome.failed == 0 and outcome.table + "\n" == md


def test_an_interrupted_grid_resumes_to_the_same_table(tmp_path):
    ref = run_grid(small(tmp_path / "ref", seeds=[1, 2])).table
    out = tmp_path / "cut"
    with pytest.raises(engine.SweepInterrupted, match="3 of 6 runs are finished"):
        run_grid(small(out, seeds=[1, 2]), after_run=interrupt_after(3))
    ran = []
    resumed = run_grid(small(out, seeds=[1, 2], resume=True), after_run=ran.append).table
    assert len(ran) == 3 and {r["seed"] for r in ran} == {2}
    assert resumed == ref


@pytest.mark.parametrize("args, says", [
    (["--n-patches", "0"], "--n-patches"),
    (["--scale", "-0.1"], "--scale values must be positive"),
    (["--scale", "0.2", "0.2"], "repeated values"),
    (["--steps", "10"], "--steps must be >= 50"),
    (["--metric", "f1"], "invalid choice"),
])
def test_bad_grid_arguments_exit_2_before_any_training(tmp_path, capsys, args, says):
    out = tmp_path / "g"
    try:
        code = cli.main(["grid", "--dataset", "digits", "--out", str(out), *args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2 and says in capsys.readouterr().err
    assert not out.exists()


def test_grid_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "g"
    code = cli.main(["grid", "--dataset", "digits", "--out", str(out), "--seeds", "1", "2",
                     "--steps", "50", "--n-clusters", "16", "--patch-size", "3", "--n-patches",
                     "20", "--scale", "0.2", "--no-progress", "--threads", "1"])
    assert code == 0
    assert "| 3 | 16 | 20 | 0.2 | 2 |" in capsys.readouterr().out
    assert (out / "grid.md").exists() and (out / "grid.json").exists()
    assert math.isfinite(json.loads((out / "grid.json").read_text())["cells"][0]["delta"])


# --- issue 30: a cell that can never run is refused before any run trains -----------------------


@pytest.mark.parametrize("axis, value, says", [
    ("--n-clusters", "64", "n_clusters must be in [1, 32], got 64"),
    ("--patch-size", "2", "patch_size (2, 2) is smaller than the kernel (3, 3)"),
    ("--n-patches", "10000000000", "GiB for the patch matrix alone"),
    ("--patch-size", "9", "images of 8×8 are smaller than the 9×9 patch"),
])
def test_a_cell_that_can_never_run_is_exit_2_naming_it_before_any_training(
        tmp_path, capsys, monkeypatch, axis, value, says):
    from prewarm_gpu.experiment import arms

    def no_training(*a, **k):
        raise AssertionError("a run was built before every cell was checked")

    monkeypatch.setattr(units, "build_arm", no_training)
    monkeypatch.setattr(arms, "build_arm", no_training)
    out = tmp_path / "g"
    good = {"--n-clusters": "16", "--patch-size": "3", "--n-patches": "10"}[axis]
    argv = ["grid", "--dataset", "digits", "--out", str(out), "--seeds", "1", "--steps", "50",
            "--n-clusters", "16", "--patch-size", "3", "--n-patches", "10", "--scale", "0.2",
            "--no-progress", axis, good, value]  # the last --axis wins: one good, one bad value
    code = cli.main(argv)
    err = capsys.readouterr().err
    cell = f"{axis[2:].replace('-', '_')}={value}"
    assert code == 2 and says in err and cell in err and "nothing was trained" in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("options", [
    {"n_clusters": 64}, {"patch_size": 2}, {"n_patches": 10**10}, {"n_patches": 0},
    {"scale": -1.0}, {"n_clusters": 16, "n_patches": 0}, {"kmeans_options": {"n_init": 0}},
    {"n_clusters": 32, "n_patches": 1, "patch_size": 7},
])
def test_the_dry_check_refuses_what_prewarm_refuses_with_the_same_message(options):
    import torch

    from prewarm_gpu import prewarm_
    from prewarm_gpu.experiment.precheck import check_prewarm_options
    from prewarm_gpu.models import build_model

    model = build_model("simplecnn", in_channels=1, n_classes=10, image_size=(8, 8))
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises((ValueError, TypeError)) as real:
        prewarm_(model, images, generator=0, **options)
    with torch.device("meta"):
        meta = build_model("simplecnn", in_channels=1, n_classes=10, image_size=(8, 8))
    with pytest.raises(type(real.value)) as dry:
        check_prewarm_options(meta, images.shape, options)
    assert str(dry.value) == str(real.value)


def test_the_dry_check_passes_what_prewarm_accepts(digits):
    from prewarm_gpu.experiment.precheck import check_arms

    check_arms(plan_grid(small(Path("unused"))), "cpu")  # the cells the tests above train
