"""The sweep: pairing, results files, failures, interruption and resume, plots."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from prewarm_gpu import experiment, initializers
from prewarm_gpu.experiment import (
    ResultsExistError,
    SweepConfig,
    build_arm,
    plan_runs,
    read_results,
    run_one,
)
from prewarm_gpu.experiment.jsonable import jsonable
from tests.conftest import run_sweep

pytestmark = pytest.mark.usefixtures("one_thread", "cached_digits")


def tiny(out: Path, **kw) -> SweepConfig:
    base = dict(datasets=["digits"], seeds=[42, 7], out=out, steps=8, loss_points=4,
                eval_points=2, progress=False)
    base.update(kw)
    return SweepConfig(**base)


def lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().split("\n") if ln.strip()]


# --- pairing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, baseline", [(42, "torch-default"), (2025, "torch-default"),
                                            (7, "he-normal"), (7, "he-uniform")])
def test_pair_differs_only_in_conv1s_first_n_clusters_filters(digits, seed, baseline):
    specs = {s.init: s for s in plan_runs(tiny(Path("unused"), seeds=[seed], steps=None,
                                               baseline=baseline))}
    rng = torch.get_rng_state()
    kaiming, _ = build_arm(specs["kaiming"], digits)
    prewarm, report = build_arm(specs["prewarm"], digits)
    assert torch.equal(rng, torch.get_rng_state())  # nothing leaked into the global RNG
    n = report["n_clusters"]
    assert n == 16
    ks, ps = kaiming.state_dict(), prewarm.state_dict()
    assert ks.keys() == ps.keys()
    for name in ks:
        if name == "conv1.weight":
            assert torch.equal(ks[name][n:], ps[name][n:]), "Kaiming half must be untouched"
            for f in range(n):
                assert not torch.equal(ks[name][f], ps[name][f]), f"filter {f} not conditioned"
        else:
            assert torch.equal(ks[name], ps[name]), f"{name} differs between the arms"
    again, _ = build_arm(specs["prewarm"], digits)
    for name, v in again.state_dict().items():
        assert torch.equal(v, ps[name]), "same seed must give the same arm"


def test_baseline_he_normal_redraws_every_layer_with_std_sqrt_2_over_fan_in(digits):
    spec = {b: plan_runs(tiny(Path("x"), seeds=[3], baseline=b))[0]
            for b in ("torch-default", "he-normal")}
    torch_default, _ = build_arm(spec["torch-default"], digits)
    he, _ = build_arm(spec["he-normal"], digits)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        w = getattr(he, name).weight
        fan_in = w[0].numel()
        assert not torch.equal(w, getattr(torch_default, name).weight)
        assert float(getattr(he, name).bias.detach().abs().max()) == 0.0
        if w.numel() > 10_000:  # enough draws for the std to be within 3 %
            assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.03)
    assert spec["he-normal"].key != spec["torch-default"].key
    assert spec["he-normal"].config["baseline"] == "he-normal"


def test_unknown_baseline_is_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="--baseline must be one of"):
        plan_runs(tiny(tmp_path, baseline="xavier"))


def test_different_seeds_give_different_weights(digits):
    a, b = (build_arm(plan_runs(tiny(Path("x"), seeds=[s]))[0], digits)[0] for s in (1, 8))
    assert not torch.equal(a.fc1.weight, b.fc1.weight)


def test_a_run_is_deterministic(digits):
    spec = plan_runs(tiny(Path("x"), seeds=[13]))[1]
    r1, r2 = run_one(spec, digits), run_one(spec, digits)
    assert r1["status"] == "ok" and r1["accuracy"] == r2["accuracy"]
    assert r1["curves"] == r2["curves"]


def test_plan_kaiming_once_per_architecture_and_seed():
    specs = plan_runs(tiny(Path("x"), inits=["kaiming", "prewarm", "lion_dg"]))
    got = [(s.seed, s.init, s.arch) for s in specs]
    assert got == [(42, "kaiming", "simplecnn"), (42, "kaiming", "ds-simplecnn"),
                   (42, "prewarm", "simplecnn"), (42, "lion_dg", "ds-simplecnn"),
                   (7, "kaiming", "simplecnn"), (7, "kaiming", "ds-simplecnn"),
                   (7, "prewarm", "simplecnn"), (7, "lion_dg", "ds-simplecnn")]
    assert len({s.key for s in specs}) == len(specs)


def test_run_keys_follow_the_config():
    key = plan_runs(tiny(Path("x")))[1].key
    assert plan_runs(tiny(Path("y"), target_loss=0.1))[1].key == key  # recomputed from curves
    assert plan_runs(tiny(Path("x"), steps=9))[1].key != key
    assert plan_runs(tiny(Path("x"), init_options={"prewarm": {"scale": 0.1}}))[1].key != key


def test_protocol_4_rekeys_cuda_and_bf16_runs_only():
    """Protocol 4 changed CUDA's arithmetic (IEEE fp32, deterministic cuDNN) and bf16's; CPU
    fp32/tf32 runs are bit-identical to protocol 3's and keep it (and their keys)."""
    from prewarm_gpu.experiment.plan import protocol_of

    assert protocol_of("cpu", "fp32") == protocol_of("cpu", "tf32") == 3
    assert protocol_of("cpu", "bf16") == protocol_of("cuda", "fp32") == 4
    cpu = plan_runs(tiny(Path("x")))[0]
    assert cpu.config["protocol"] == 3
    assert plan_runs(tiny(Path("x"), precision="bf16"))[0].config["protocol"] == 4


def test_an_initialisers_version_rekeys_its_runs_only(monkeypatch):
    """A change to one initialiser's results bumps its registry version: its runs get new keys
    (``--resume`` reruns them), the Kaiming runs keep theirs (version 1 adds nothing to a key)."""
    before = [s.key for s in plan_runs(tiny(Path("x")))]
    prewarm = initializers.INITIALIZERS["prewarm"]
    monkeypatch.setattr(prewarm, "version", prewarm.version + 1)
    after = plan_runs(tiny(Path("x")))
    assert [s.key for s in after][0] == before[0]  # kaiming
    assert after[1].key != before[1] and after[1].config["init_version"] == prewarm.version


def test_plan_rejects_unknown_inits_and_a_lone_baseline():
    with pytest.raises(KeyError, match="known:"):
        plan_runs(tiny(Path("x"), inits=["kaiming", "nope"]))
    with pytest.raises(ValueError, match="nothing to compare"):
        plan_runs(tiny(Path("x"), inits=["kaiming"]))


# --- the sweep and its files ----------------------------------------------------------------------


def test_sweep_writes_results_summary_table_and_plots(tmp_path):
    table = run_sweep(tiny(tmp_path, plot=True))
    recs = [json.loads(ln) for ln in lines(tmp_path / "results.jsonl")]
    assert [(r["init"], r["seed"]) for r in recs] == [("kaiming", 42), ("prewarm", 42),
                                                      ("kaiming", 7), ("prewarm", 7)]
    r = recs[1]
    assert r["status"] == "ok" and 0 <= r["accuracy"] <= 1 and r["config"]["train"]["steps"] == 8
    assert r["curves"]["acc_steps"] == [0, 4, 8] and r["curves"]["loss_steps"] == [2, 4, 6, 8]
    assert r["init_report"]["n_clusters"] == 16 and r["seconds"] > 0
    for k in ("torch", "torchvision", "numpy", "sklearn", "python", "device", "git_commit"):
        assert k in r["env"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    pw = summary["datasets"]["digits"]["methods"]["prewarm"]
    assert pw["seeds"] == [42, 7] and pw["stats"]["n"] == 2
    assert pw["kaiming_acc"] == [recs[0]["accuracy"], recs[2]["accuracy"]]
    assert (tmp_path / "table.md").read_text().strip() == table.strip()
    assert "| Digits (8×8) | prewarm | 2 |" in table
    assert ("Digits (8×8): 8 steps, batch 256, lr 0.003→3e-05, 2 seeds (42 7), fp32, device cpu; "
            "\"Kaiming\" is the baseline torch-default (PyTorch's default init, "
            "kaiming_uniform_(a=√5)") in table
    assert "marked only from n ≥ 5 pairs" in table
    for png in ("filters_digits.png", "curves_digits.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_existing_results_are_never_overwritten(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"key": "x"}\n')
    with pytest.raises(ResultsExistError, match="--resume"):
        run_sweep(tiny(tmp_path))
    assert (tmp_path / "results.jsonl").read_text() == '{"key": "x"}\n'


def test_interrupted_sweep_resumes_only_missing_runs_and_survives_a_truncated_line(tmp_path):
    path = tmp_path / "results.jsonl"

    def interrupt_after(k):
        seen = []

        def hook(rec):
            seen.append(rec["key"])
            if len(seen) == k:
                raise KeyboardInterrupt

        return hook, seen

    hook, _ = interrupt_after(3)
    with pytest.raises(KeyboardInterrupt) as e:
        run_sweep(tiny(tmp_path), after_run=hook)
    assert len(lines(path)) == 3  # every finished run kept
    assert isinstance(e.value, experiment.SweepInterrupted)
    assert str(e.value).startswith(f"3 of 4 runs are finished and kept in {path} (3 written")
    assert "--resume" in str(e.value)

    ran = []
    run_sweep(tiny(tmp_path, resume=True), after_run=lambda r: ran.append((r["init"], r["seed"])))
    assert ran == [("prewarm", 7)]
    keys = [json.loads(ln)["key"] for ln in lines(path)]
    assert len(keys) == len(set(keys)) == 4

    # A run killed while writing: the last line is cut short.
    text = path.read_text()
    path.write_text(text[: len(text) - 40])
    ran.clear()
    logged = []
    table = run_sweep(tiny(tmp_path, resume=True), log=logged.append,
                      after_run=lambda r: ran.append((r["init"], r["seed"])))
    assert ran == [("prewarm", 7)] and "| Digits (8×8) | prewarm | 2 |" in table
    assert any("moved 1 corrupt or truncated line" in m for m in logged)
    torn = tmp_path / "results.jsonl.torn"
    assert torn.read_text() == text[: len(text) - 40].splitlines()[-1] + "\n"
    for ln in lines(path):  # valid JSON lines again: any reader can read every line
        json.loads(ln)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = read_results(path)
    assert len(recs) == 4 and len({r["key"] for r in recs}) == 4


def test_interrupting_a_batch_says_the_batch_in_flight_was_lost(tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("prewarm_gpu.training.loop.train_batched", interrupt)
    with pytest.raises(experiment.SweepInterrupted) as e:
        run_sweep(tiny(tmp_path))
    msg = str(e.value)
    assert msg.startswith("0 of 4 runs are finished and kept")
    assert "Lost: the 4 runs training together (digits, batched)" in msg
    assert "Nothing to resume: run the same command again (without --resume)" in msg


def test_resume_of_a_folder_without_results_is_refused(tmp_path):
    with pytest.raises(experiment.NothingToResumeError, match="nothing to resume"):
        run_sweep(tiny(tmp_path / "new", resume=True))
    assert not (tmp_path / "new").exists()


def test_steps_zero_is_refused_not_replaced_by_the_default(tmp_path):
    with pytest.raises(ValueError, match="steps and batch_size must be >= 1, got 0"):
        run_sweep(tiny(tmp_path, steps=0))


def test_an_init_option_typo_is_refused_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="prewarm has no option 'scle' .did you mean 'scale'"):
        run_sweep(tiny(tmp_path, init_options={"prewarm": {"scle": 0.3}}))
    assert not (tmp_path / "results.jsonl").exists()


def test_a_programming_error_in_an_initialiser_is_not_a_failed_row(tmp_path, monkeypatch):
    def buggy(model, *, data=None, generator=None, **options):
        return model.no_such_attribute

    monkeypatch.setitem(initializers.INITIALIZERS, "buggy", buggy)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        run_sweep(tiny(tmp_path, inits=["kaiming", "buggy"], batch=False, seeds=[42]))
    recs = read_results(tmp_path / "results.jsonl")
    assert [r["init"] for r in recs] == ["kaiming"]  # the finished run is kept


def _rec(key, **kw):
    base = {"key": key, "status": "ok", "accuracy": 0.9, "config": {}, "curves": {}}
    return json.dumps({**base, **kw})


def test_read_results_skips_garbage(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(f'{_rec("a")}\nnot json\n[1, 2]\n{_rec("b")}\n{{"key": "c", "trunc')
    with pytest.warns(UserWarning) as w:
        recs = read_results(p)
    assert [r["key"] for r in recs] == ["a", "b"]
    assert len(w) == 3 and "last line" in str(w[-1].message)


@pytest.mark.parametrize("line, why", [
    ('{"key": ["x"]}', "no string 'key'"),
    ('{"key": "k", "status": "ok"}', "no 'config' object"),
    (_rec("k", accuracy=float("nan")), "without a finite accuracy"),
    (_rec("k", accuracy=None), "without a finite accuracy"),
    (_rec("k", status="done"), "neither 'ok' nor 'failed'"),
])
def test_incomplete_records_are_corrupt_not_trusted(tmp_path, line, why):
    p = tmp_path / "results.jsonl"
    p.write_text(f'{_rec("a")}\n{line}\n')
    with pytest.warns(UserWarning, match=why):
        assert [r["key"] for r in read_results(p)] == ["a"]
    assert experiment.repair_results(p) == 1
    assert (tmp_path / "results.jsonl.torn").read_text() == line + "\n"
    assert p.read_text() == _rec("a") + "\n"


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def nan_init(model, *, data=None, generator=None, **options):
        with torch.no_grad():
            model.conv1.weight.fill_(math.nan)
        return {"why": math.nan}

    def broken(model, *, data=None, generator=None, **options):
        raise RuntimeError("initialiser exploded")

    monkeypatch.setitem(initializers.INITIALIZERS, "nan_init", nan_init)
    monkeypatch.setitem(initializers.INITIALIZERS, "broken", broken)
    cfg = tiny(tmp_path, seeds=[42], inits=["kaiming", "nan_init", "broken"])
    table = run_sweep(cfg)
    recs = {r["init"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert recs["kaiming"]["status"] == "ok"
    assert recs["nan_init"]["status"] == "failed" and recs["nan_init"]["failed_step"] == 1
    assert recs["nan_init"]["init_report"] == {"why": None}  # NaN never reaches the JSON
    assert recs["broken"]["error"] == "RuntimeError: initialiser exploded"
    assert 'raise RuntimeError("initialiser exploded")' in recs["broken"]["traceback"]
    assert "failed: digits nan_init seed 42 at step 1" in table
    assert "failed: digits broken seed 42: RuntimeError: initialiser exploded" in table
    ran = []
    run_sweep(tiny(tmp_path, seeds=[42], inits=cfg.inits, resume=True), after_run=ran.append)
    assert ran == []  # failures are results; --retry-failed reruns them
    run_sweep(tiny(tmp_path, seeds=[42], inits=cfg.inits, resume=True, retry_failed=True),
              after_run=lambda r: ran.append(r["init"]))
    assert ran == ["nan_init", "broken"]


def test_methods_on_another_architecture_pair_with_kaiming_on_it(tmp_path):
    run_sweep(tiny(tmp_path, seeds=[42], steps=4, inits=["kaiming", "prewarm", "lion_dg"],
                   save_models=True))
    recs = read_results(tmp_path / "results.jsonl")
    assert all(r["status"] == "ok" for r in recs) and len(recs) == 4
    summary = json.loads((tmp_path / "summary.json").read_text())["datasets"]["digits"]
    ds_kaiming = next(r for r in recs if r["init"] == "kaiming" and r["arch"] == "ds-simplecnn")
    assert summary["methods"]["lion_dg"]["arch"] == "ds-simplecnn"
    assert summary["methods"]["lion_dg"]["kaiming_acc"] == [ds_kaiming["accuracy"]]
    names = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert names == ["digits-kaiming+ds_simplecnn-42.pt", "digits-kaiming-42.pt",
                     "digits-lion_dg-42.pt", "digits-prewarm-42.pt"]
    state = torch.load(tmp_path / "models" / "digits-prewarm-42.pt", weights_only=True)
    assert state["conv1.weight"].shape == (32, 1, 3, 3)


def test_jsonable():
    j = jsonable({"a": torch.tensor([1.0, float("inf")]), "b": (1, "x"),
                           "c": torch.zeros(2000), 3: float("nan")})
    assert j == {"a": [1.0, None], "b": [1, "x"], "c": {"shape": [2000], "dtype": "float32"},
                 "3": None}


def test_report_only_rewrites_the_tables_without_training(tmp_path):
    run_sweep(tiny(tmp_path, seeds=[42]))
    (tmp_path / "table.md").unlink()
    ran = []
    table = run_sweep(tiny(tmp_path, seeds=[42, 7], report_only=True), after_run=ran.append)
    assert ran == [] and (tmp_path / "table.md").read_text().strip() == table.strip()
    # the dataset rule (digits: d 0.3458 → 23) is in the label, as in the key
    assert "not run yet (2): digits kaiming seed 7, digits prewarm(n_patches=23) seed 7" in table
    with pytest.raises(experiment.NothingToResumeError, match="no results to report"):
        run_sweep(tiny(tmp_path / "empty", report_only=True))


def test_an_initialiser_that_draws_from_the_global_rng_is_a_failed_run(tmp_path, monkeypatch):
    def sneaky(model, *, data=None, generator=None, **options):
        with torch.no_grad():
            model.conv1.weight.add_(torch.randn_like(model.conv1.weight))  # not its generator
        return {}

    monkeypatch.setitem(initializers.INITIALIZERS, "sneaky", sneaky)
    table = run_sweep(tiny(tmp_path, inits=["kaiming", "sneaky"], seeds=[42]))
    rec = {r["init"]: r for r in read_results(tmp_path / "results.jsonl")}
    assert rec["kaiming"]["status"] == "ok" and rec["sneaky"]["status"] == "failed"
    assert "drew from the global random number generator" in rec["sneaky"]["error"]
    assert "failed: digits sneaky seed 42" in table


def test_build_arm_neither_reads_nor_moves_the_global_rng(digits):
    spec = next(s for s in plan_runs(tiny(Path("unused"), seeds=[7])) if s.init == "prewarm")
    torch.default_generator.manual_seed(0)
    a, _ = build_arm(spec, digits)
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(12345)  # another global state: the same arm
    b, _ = build_arm(spec, digits)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    torch.default_generator.manual_seed(0)
    build_arm(spec, digits)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is where it was


@pytest.mark.parametrize("batch, backend, recorded", [(True, "grouped", "grouped"),
                                                       (True, "auto", "loop"),
                                                       (False, "grouped", "loop")])
def test_each_record_names_the_backend_that_trained_it(tmp_path, batch, backend, recorded):
    """A stacked group records the backend ``auto`` chose (on the CPU: the loop, the fastest
    measured there); a run trained alone uses ``train``, its own kernels: the loop."""
    run_sweep(tiny(tmp_path, seeds=[42], steps=2, batch=batch, backend=backend))
    recs = [json.loads(ln) for ln in lines(tmp_path / "results.jsonl")]
    assert len(recs) == 2 and {r["backend"] for r in recs} == {recorded}
    assert {r["trainer"] for r in recs} == {"batched" if batch else "single"}
