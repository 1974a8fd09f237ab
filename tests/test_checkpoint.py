"""One trainer, checkpointed inside runs: kill and resume is bit-identical on the CPU (issue 17)."""

import copy
import json

import pytest
import torch

from prewarm_gpu import experiment
from prewarm_gpu.counters import count_dispatch
from prewarm_gpu.experiment import SweepConfig, engine, read_results, units
from prewarm_gpu.methods.lion_dg import DSSimpleCNN
from prewarm_gpu.models import SimpleCNN
from prewarm_gpu.train import MEASURED, TrainConfig, choose_backend, train, train_batched
from prewarm_gpu.training.checkpoint import Checkpointer, parse_every
from tests.conftest import run_sweep


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _models(seeds):
    out = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)  # the CPU generator alone
            out.append(SimpleCNN(1, 10, 8))
    return out


def _killer(at_run_steps: int):
    """A progress callback that interrupts once ``at_run_steps`` run-steps are reported."""
    seen = [0]

    def progress(n):
        seen[0] += n
        if seen[0] >= at_run_steps:
            raise KeyboardInterrupt

    return progress


def _same_state(a: list[torch.nn.Module], b: list[torch.nn.Module]) -> None:
    for ma, mb in zip(a, b, strict=True):
        for (na, ta), (nb, tb) in zip(ma.state_dict().items(), mb.state_dict().items(),
                                      strict=True):
            assert na == nb and torch.equal(ta, tb), na


def _same_results(a, b) -> None:
    for ra, rb in zip(a, b, strict=True):
        da, db = ra.as_dict(), rb.as_dict()
        da.pop("seconds"), db.pop("seconds")
        assert da == db


CFG = TrainConfig(steps=24, batch_size=64, loss_points=24, eval_points=3)
SEEDS = [42, 7]


@pytest.mark.parametrize("backend", ["loop", "grouped", "vmap"])
def test_a_killed_and_resumed_batch_is_bit_identical(digits, tmp_path, backend):
    models = _models(SEEDS)
    ref_models = copy.deepcopy(models)
    ref = train_batched(ref_models, digits, CFG, seeds=SEEDS, backend=backend)

    path = tmp_path / "ck.pt"
    ck = Checkpointer(path, "these runs", every_steps=5)
    with pytest.raises(KeyboardInterrupt):
        train_batched(copy.deepcopy(models), digits, CFG, seeds=SEEDS, backend=backend,
                      checkpoint=ck, progress=_killer(2 * 13))
    assert ck.saved_step == 10 and path.exists() and path.with_name("ck.pt.prev").exists()

    resumed_models = copy.deepcopy(models)  # the harness rebuilds the initial models
    ck2 = Checkpointer(path, "these runs", every_steps=5)
    reported = []
    resumed = train_batched(resumed_models, digits, CFG, seeds=SEEDS, backend=backend,
                            checkpoint=ck2, progress=reported.append)
    assert reported[0] == 2 * 10 and sum(reported) == 2 * CFG.steps  # progress from step 10
    _same_state(resumed_models, ref_models)
    _same_results(resumed, ref)
    assert [r.acc_steps for r in ref] == [[0, 8, 16, 24]] * 2


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one_then_to_step_0(digits, tmp_path):
    models = _models([3])
    ref_models = copy.deepcopy(models)
    ref = train(ref_models[0], digits, CFG, seed=3)
    path = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(models[0]), digits, CFG, seed=3, progress=_killer(17),
              checkpoint=Checkpointer(path, "run", every_steps=5))
    path.write_bytes(path.read_bytes()[:1000])  # torn: the newest checkpoint is unusable
    m = copy.deepcopy(models[0])
    with pytest.warns(UserWarning, match="unusable .* falling back to the previous one"):
        res = train(m, digits, CFG, seed=3, checkpoint=Checkpointer(path, "run", every_steps=5))
    _same_state([m], ref_models)
    _same_results([res], [ref])

    for p in (path, path.with_name("ck.pt.prev")):
        p.write_bytes(b"garbage")
    m = copy.deepcopy(models[0])
    with pytest.warns(UserWarning, match="falling back to step 0"):
        res = train(m, digits, CFG, seed=3, checkpoint=Checkpointer(path, "run", every_steps=50))
    _same_state([m], ref_models)
    _same_results([res], [ref])


def test_a_checkpoint_of_other_runs_is_never_loaded(digits, tmp_path):
    path = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        train(_models([3])[0], digits, CFG, seed=3, progress=_killer(12),
              checkpoint=Checkpointer(path, "run A", every_steps=5))
    with pytest.warns(UserWarning, match="belongs to other runs"):
        assert Checkpointer(path, "run B").load() is None


@pytest.mark.parametrize("text, want", [("500", (500, None)), ("10m", (None, 600.0)),
                                        ("90s", (None, 90.0)), ("0", (None, None)),
                                        (None, (None, None))])
def test_parse_every(text, want):
    assert parse_every(text) == want


@pytest.mark.parametrize("text", ["ten", "1.5", "-3", "5h"])
def test_parse_every_refuses_nonsense(text):
    with pytest.raises(ValueError, match="--checkpoint-every"):
        parse_every(text)


# --- one trainer ---------------------------------------------------------------------------------


def test_accuracy_marks_do_not_depend_on_loss_marks(digits):
    # Before, the batched trainer evaluated only at steps that were also loss marks: with 2 loss
    # points and 3 eval points it recorded accuracy at [0, 30] instead of [0, 10, 20, 30].
    cfg = TrainConfig(steps=30, batch_size=64, loss_points=2, eval_points=3)
    single = train(_models([1])[0], digits, cfg, seed=1)
    many = train_batched(_models([1, 2]), digits, cfg, seeds=[1, 2], backend="grouped")
    for r in (single, *many):
        assert r.acc_steps == [0, 10, 20, 30] and len(r.test_acc) == 4
        assert r.loss_steps == [15, 30]


def test_one_run_honours_its_precision(digits):
    # Before, the single-run trainer ignored precision: bf16 trained in fp32 under a bf16 label.
    cfg = TrainConfig(steps=6, batch_size=64, loss_points=6, eval_points=1)
    fp32 = train(_models([5])[0], digits, cfg, seed=5, precision="fp32")
    bf16 = train(_models([5])[0], digits, cfg, seed=5, precision="bf16")
    assert fp32.loss != bf16.loss


def test_the_harness_single_run_trains_in_the_recorded_precision(digits, tmp_path, monkeypatch):
    seen = []
    real = units.train

    def spy(*a, **k):
        seen.append(k["precision"])
        return real(*a, **k)

    monkeypatch.setattr(units, "load_dataset", lambda *a, **k: digits)
    monkeypatch.setattr(units, "train", spy)
    run_sweep(SweepConfig(seeds=[1], out=tmp_path, steps=4, eval_points=1, loss_points=2,
                          batch=False, precision="bf16", progress=False))
    assert seen == ["bf16", "bf16"]
    assert {r["config"]["precision"] for r in read_results(tmp_path / "results.jsonl")} == \
        {"bf16"}


def test_deep_supervision_trains_on_the_loop_backend_only():
    ds = [DSSimpleCNN(in_channels=1, n_classes=10, image_size=8) for _ in range(2)]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", ds, cuda) == "loop"
    with pytest.raises(ValueError, match="auxiliary heads need the loop backend"):
        choose_backend("grouped", ds, cpu)
    simple = _models([1, 2])
    assert choose_backend("auto", simple, cpu) == max(MEASURED["cpu"], key=MEASURED["cpu"].get)
    assert choose_backend("auto", simple, cuda) == "grouped"  # measured fastest on the H100
    assert choose_backend("auto", simple, torch.device("mps")) == "loop"  # nothing measured


# --- no host sync in the step loop ---------------------------------------------------------------


@pytest.mark.parametrize("backend, runs, max_ops", [("loop", 1, 105), ("grouped", 2, 134),
                                                    ("vmap", 2, 267), ("bmm", 2, 326)])
def test_the_step_loop_never_syncs_and_its_ops_are_counted(digits, backend, runs, max_ops):
    """Between curve points and evaluations the loop dispatches no host sync: 10 and 30 steps
    with the same marks sync equally often. Ops per step (measured on the CPU: loop, 1 run,
    100.2; grouped, 2 runs, 127.2; vmap, 2 runs, 254.2; bmm, 2 runs, 310.2; a new epoch's
    randperm adds a few) are held within 5 %."""
    counts = {}
    for steps in (10, 30):
        cfg = TrainConfig(steps=steps, batch_size=64, loss_points=1, eval_points=1)
        with count_dispatch() as c:
            train_batched(_models(range(runs)), digits, cfg, seeds=list(range(runs)),
                          backend=backend)
        counts[steps] = c
    assert counts[30].n_syncs == counts[10].n_syncs, (counts[10].syncs, counts[30].syncs)
    per_step = (counts[30].n_ops - counts[10].n_ops) / 20
    assert per_step <= max_ops, per_step


# --- in the sweep --------------------------------------------------------------------------------


def _sweep(out, **kw):
    base = dict(datasets=["digits"], seeds=[42, 7], out=out, steps=20, loss_points=20,
                eval_points=2, progress=False, checkpoint_every="4")
    base.update(kw)
    return SweepConfig(**base)


class _KillingBar:
    def __init__(self, at):
        self.n, self.at = 0, at

    def update(self, n):
        self.n += n
        if self.n >= self.at:
            raise KeyboardInterrupt

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("batch", [True, False])
def test_an_interrupted_sweep_resumes_from_checkpoints_to_the_same_records(
        digits, tmp_path, monkeypatch, batch):
    monkeypatch.setattr(units, "load_dataset", lambda *a, **k: digits)
    run_sweep(_sweep(tmp_path / "ref", batch=batch))
    ref = {r["key"]: r for r in read_results(tmp_path / "ref" / "results.jsonl")}

    out = tmp_path / "cut"
    at = 4 * 11 if batch else 20 + 11  # the batch of 4 at step 11; single: run 2 at step 11
    monkeypatch.setattr(engine, "_progress_bar", lambda total, enabled: _KillingBar(at))
    with pytest.raises(experiment.SweepInterrupted) as e:
        run_sweep(_sweep(out, batch=batch, progress=True))
    assert "progress up to step 8 is checkpointed" in str(e.value)
    assert any((out / "checkpoints").glob("*.pt"))

    monkeypatch.setattr(engine, "_progress_bar", lambda total, enabled: None)
    run_sweep(_sweep(out, batch=batch, resume=True))
    got = {r["key"]: r for r in read_results(out / "results.jsonl")}
    assert got.keys() == ref.keys()
    for k, r in got.items():
        assert r["accuracy"] == ref[k]["accuracy"] and r["curves"] == ref[k]["curves"], k
    assert not any((out / "checkpoints").glob("*"))  # finished runs' checkpoints are removed
    assert json.loads((out / "summary.json").read_text())["datasets"]["digits"]["missing"] == []


def test_measured_speeds_from_a_benchmark_json_decide_auto(tmp_path):
    from prewarm_gpu.train import load_measured

    before = {k: dict(v) for k, v in MEASURED.items()}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"measured": {"cpu": {"grouped": 99.0, "vmap": 1.0,
                                                     "loop": 2.0}}}))
    table = load_measured(str(path))
    cpu = torch.device("cpu")
    assert choose_backend("auto", _models([1, 2]), cpu, table) == "grouped"
    assert {k: dict(v) for k, v in MEASURED.items()} == before  # the built-in table is unchanged
    assert choose_backend("auto", _models([1, 2]), cpu) == max(before["cpu"],
                                                                key=before["cpu"].get)
    with pytest.raises(TypeError):
        MEASURED["cpu"]["grouped"] = 1.0  # read-only: no caller can change what auto reads
    path.write_text(json.dumps({"measured": {"cpu": {"magic": 1.0}}}))
    with pytest.raises(ValueError, match="unknown backends"):
        load_measured(str(path))
