"""``benchmarks/gpu_suite.py`` cannot lose a result: isolated parts, a JSON after every case, the
budget, and a launch counter that counts kernels only (issues 24 and 31)."""

import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts benchmarks/ on sys.path: its parts import as below
    return mod


@pytest.fixture(scope="module")
def parts(suite):
    """The suite's modules, where the names not read by the entry point live."""
    import gpu_suite_parts.core
    import gpu_suite_parts.measure
    import gpu_suite_parts.smoke
    import gpu_suite_parts.summary
    import gpu_suite_parts.training

    return gpu_suite_parts


def _read(out: Path) -> dict:
    (path,) = out.glob("gpu-suite-*.json")
    return json.loads(path.read_text())


def _fake_part(name, seconds=0.0):
    def part(ctx):
        ctx.case(f"{name} case", lambda: time.sleep(seconds) or {"value": 1}, guess=seconds)
    return part


# --- isolation and the JSON -----------------------------------------------------------------------


def test_a_part_that_raises_is_recorded_and_the_others_still_run_and_are_written(
        suite, parts, tmp_path, monkeypatch, capsys):
    def broken(ctx):
        ctx.case("fine", lambda: {"value": 2}, guess=0)
        raise ValueError("boom in prewarm")

    fakes = {name: _fake_part(name) for name in suite.PARTS}
    fakes["prewarm"] = broken
    monkeypatch.setattr(suite, "PART_FNS", fakes)
    seen = []  # the JSON on disk after every write
    real_write = parts.core.write_atomic

    def write(path, data):
        real_write(path, data)
        seen.append(json.loads(Path(path).read_text()))  # valid JSON every time

    monkeypatch.setattr(parts.core, "write_atomic", write)
    code = suite.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])

    assert code == 1
    res = _read(tmp_path)
    assert res["status"] == "failed"
    err = res["parts"]["prewarm"]["error"]
    assert res["parts"]["prewarm"]["status"] == "failed"
    assert err["type"] == "ValueError" and err["message"] == "boom in prewarm"
    assert any("boom in prewarm" in ln for ln in err["traceback"])
    assert res["prewarm"]["fine"]["status"] == "ok"  # its finished case is kept
    for name in ("smoke", "kmeans", "training"):  # before and after the failure
        assert res["parts"][name]["status"] == "ok"
        assert res[name][f"{name} case"] == {"status": "ok", "seconds": pytest.approx(0, abs=1),
                                             "value": 1}
    assert res["parts"]["tests"] == {"status": "skipped", "reason": "needs CUDA", "seconds": 0.0}
    # Written after every case and every part: the kmeans case was on disk before training ran.
    at_kmeans = next(s for s in seen if "kmeans case" in s.get("kmeans", {}))
    assert "training" not in at_kmeans["parts"] and at_kmeans["parts"]["prewarm"]["status"] == \
        "failed"
    assert len(seen) >= 2 * len(suite.PARTS)
    table = capsys.readouterr().out
    assert "| prewarm | failed: ValueError |" in table and res["commit"] is not None


def test_a_case_that_raises_fails_its_part_but_not_the_next_case(suite, tmp_path, monkeypatch):
    def part(ctx):
        ctx.case("bad", lambda: 1 / 0, guess=0)
        ctx.case("good", lambda: {"x": 3}, guess=0)

    monkeypatch.setattr(suite, "PART_FNS", {**suite.PART_FNS, "smoke": part})
    assert suite.main(["--device", "cpu", "--quick", "--smoke", "--out", str(tmp_path)]) == 1
    res = _read(tmp_path)
    assert res["smoke"]["bad"]["status"] == "failed"
    assert res["smoke"]["bad"]["error"]["type"] == "ZeroDivisionError"
    assert res["smoke"]["good"]["status"] == "ok" and res["smoke"]["good"]["x"] == 3
    assert res["parts"]["smoke"]["failed_cases"] == ["bad"]
    assert list(res["parts"]) == ["smoke"]


def test_sigterm_records_the_case_in_flight_and_still_writes(suite, tmp_path, monkeypatch):
    def part(ctx):
        ctx.case("done", lambda: {"x": 1}, guess=0)
        ctx.case("in flight", lambda: suite._on_sigterm(15, None), guess=0)

    monkeypatch.setattr(suite, "PART_FNS", {**suite.PART_FNS, "smoke": part})
    code = suite.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    res = _read(tmp_path)
    assert code == 128 + 15 and res["status"] == "interrupted"
    assert res["smoke"]["done"]["status"] == "ok"
    assert res["smoke"]["in flight"]["status"] == "interrupted"
    assert res["parts"]["kmeans"] == {"status": "skipped", "reason": "interrupted"}


# --- the budget -----------------------------------------------------------------------------------


def test_part_share_gives_parts_in_order_what_they_want_then_grows_them(parts):
    share = parts.core.part_share
    assert share(100, [60, 90, 25]) == 60  # short: the first part gets all it wants
    assert share(30, [60, 90]) == 30  # shorter than it wants: all there is
    assert share(350, [60, 90, 25]) == pytest.approx(120)  # 2× what all want: 2× each
    assert share(0, [60]) == 0


def test_training_sizes_fill_the_comparison_then_the_sweep(parts):
    cost = {"overhead": 10.0, "per_compare": 0.3, "per_sweep": 0.02}
    sizes = parts.training.training_sizes
    assert sizes(12.0, cost) is None  # 10 compare steps need 13 s
    assert sizes(25.0, cost) == (50, 50)  # 15 s: 50 steps, no room for a sweep
    c, s = sizes(60.0, cost)
    assert c == 100 and s == 1000  # 10 + 30 + 0.02·1000 = 60
    assert 10 + 0.3 * c + 0.02 * s <= 60.0


def test_the_training_cost_model_is_refitted_from_a_bench_training_row(parts):
    row = {"runs": 16, "compare_steps": 100, "sweep_steps": 1000, "paper_style_s": 16.0,
           "single_run_s": 5.0, "batched_s": 2.0, "sweep_batched_s": 20.0,
           "backend_run_steps_s": {"grouped": 800.0, "vmap": 800.0, "loop": 400.0}}
    cost = parts.training._train_cost(row, seconds=60.0)
    # compare: 16 + 5 + 2 + 1600/800 + 1600/800 + 1600/400 = 31 s over 100 steps
    assert cost == pytest.approx({"per_compare": 0.31, "per_sweep": 0.02, "overhead": 9.0})
    same = {**row, "sweep_steps": 100, "sweep_batched_s": 2.0}  # the sweep was the comparison
    assert parts.training._train_cost(same, seconds=40.0) == pytest.approx(
        {"per_compare": 0.31, "per_sweep": 0.02, "overhead": 9.0})


def test_fake_parts_longer_than_the_budget_are_cut_between_cases(suite, tmp_path, monkeypatch):
    def slow(ctx):
        for i in range(50):
            ctx.case(f"c{i}", lambda: time.sleep(0.2), guess=0.2)

    monkeypatch.setattr(suite, "PART_FNS", {n: slow for n in suite.PARTS})
    t = time.monotonic()
    assert suite.main(["--device", "cpu", "--quick", "--budget", "4", "--out", str(tmp_path)],
                      started=t) == 0
    wall = time.monotonic() - t
    res = _read(tmp_path)
    assert wall <= 4.0, wall
    ran = [k for k, v in res["smoke"].items() if v["status"] == "ok"]
    cut = [k for k, v in res["smoke"].items() if v["status"] == "skipped"]
    assert ran and cut and "left of the smoke part's share" in res["smoke"][cut[0]]["reason"]
    assert res["parts"]["smoke"]["skipped_cases"] == cut
    assert any(res["parts"][n]["status"] == "skipped" and "of the budget left"
               in res["parts"][n]["reason"] for n in ("prewarm", "kmeans", "training"))


def test_a_case_cut_by_the_share_is_skipped_not_failed(suite, tmp_path, monkeypatch):
    """A subprocess given what is left of the share as its timeout (the cli case) and cut by it
    is a skip, as a case that does not fit is; a timeout with time left is a failure."""
    import subprocess

    def part(ctx):
        def cut():
            ctx.ends = time.monotonic()  # the share runs out while the subprocess runs
            raise subprocess.TimeoutExpired(["prewarm-gpu"], 1.0)

        def hung():
            raise subprocess.TimeoutExpired(["prewarm-gpu"], 1.0)

        ctx.case("hung", hung, guess=0)
        ctx.case("cut", cut, guess=0)
    monkeypatch.setattr(suite, "PART_FNS", {**suite.PART_FNS, "smoke": part})
    assert suite.main(["--device", "cpu", "--quick", "--smoke", "--out", str(tmp_path)]) == 1
    res = _read(tmp_path)
    assert res["smoke"]["cut"]["status"] == "skipped" and "cut at the end" in \
        res["smoke"]["cut"]["reason"]
    assert res["smoke"]["hung"]["status"] == "failed"
    assert res["parts"]["smoke"]["failed_cases"] == ["hung"]
    assert res["parts"]["smoke"]["skipped_cases"] == ["cut"]


def test_the_real_quick_suite_with_a_short_budget_ends_inside_it(suite, tmp_path, one_thread):
    t = time.monotonic()
    code = suite.main(["--device", "cpu", "--quick", "--budget", "8", "--out", str(tmp_path)],
                      started=t)
    wall = time.monotonic() - t
    res = _read(tmp_path)
    assert code == 0, res
    assert wall <= 8.0, (wall, res["parts"])
    skipped = [n for n, p in res["parts"].items() if p["status"] == "skipped"] + \
        [c for n in res["parts"] for c in res["parts"][n].get("skipped_cases", [])]
    assert skipped, res["parts"]
    assert res["smoke"] and all(r["status"] in ("ok", "skipped") for r in res["smoke"].values())


def test_a_bad_budget_or_device_is_refused(suite, tmp_path, capsys):
    for argv, said in ((["--budget", "0"], "--budget must be > 0"),
                       (["--device", "meta"], "cuda or cpu device")):
        with pytest.raises(SystemExit) as e:
            suite.main([*argv, "--out", str(tmp_path)])
        assert e.value.code == 2 and said in capsys.readouterr().err


# --- the launch counter (issue 31 item 6) ---------------------------------------------------------


CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _events_with_activity_type():
    # What torch's profiler gives for a call that launches two kernels, reads one value back and
    # fills one buffer (Kineto's activity types, torch >= the version that exposes them).
    return [SimpleNamespace(device_type=CPU, activity_type="cpu_op", name="aten::add"),
            SimpleNamespace(device_type=CPU, activity_type="cuda_runtime",
                            name="cudaLaunchKernel"),
            SimpleNamespace(device_type=CUDA, activity_type="kernel",
                            name="void at::native::vectorized_elementwise_kernel<4>"),
            SimpleNamespace(device_type=CUDA, activity_type="kernel", name="gemv2T_kernel"),
            SimpleNamespace(device_type=CUDA, activity_type="gpu_memcpy",
                            name="Memcpy DtoH (Device -> Pageable)"),
            SimpleNamespace(device_type=CUDA, activity_type="gpu_memset",
                            name="Memset (Device)"),
            SimpleNamespace(device_type=CUDA, activity_type="gpu_user_annotation",
                            name="my_range")]


def test_the_launch_counter_counts_kernels_not_copies_or_fills(parts):
    events = _events_with_activity_type()
    counts = parts.measure.count_device_events(events)
    assert counts == {"kernel": 2, "memcpy": 1, "memset": 1, "other": 1}
    # The old count, every event on the CUDA device, was 5.
    assert sum(e.device_type == CUDA for e in events) == 5


def test_the_launch_counter_reads_names_when_events_carry_no_activity_type(parts):
    events = [SimpleNamespace(device_type=e.device_type, name=e.name)
              for e in _events_with_activity_type()[:6]]
    assert parts.measure.count_device_events(events) == {"kernel": 2, "memcpy": 1, "memset": 1,
                                                 "other": 0}


def test_the_launch_counter_on_torch_function_events(parts):
    from torch.autograd.profiler_util import FunctionEvent

    def ev(i, name, device_type, **kw):
        try:
            return FunctionEvent(id=i, name=name, thread=0, start_us=i, end_us=i + 1,
                                 device_type=device_type, **kw)
        except TypeError:  # a torch whose FunctionEvent has no activity_type
            return FunctionEvent(id=i, name=name, thread=0, start_us=i, end_us=i + 1,
                                 device_type=device_type)

    events = [ev(0, "aten::mm", CPU, activity_type="cpu_op"),
              ev(1, "ampere_sgemm_32x32", CUDA, activity_type="kernel"),
              ev(2, "Memcpy HtoD (Pageable -> Device)", CUDA, activity_type="gpu_memcpy"),
              ev(3, "Memset (Device)", CUDA, activity_type="gpu_memset")]
    assert parts.measure.count_device_events(events) == {"kernel": 1, "memcpy": 1, "memset": 1,
                                                 "other": 0}


# --- the JSON's tables ---------------------------------------------------------------------------


def test_the_training_part_writes_the_table_auto_reads(parts, tmp_path):
    from prewarm_gpu.train import MEASURED, load_measured

    rows = {"mnist": {"status": "ok", "backend_run_steps_s": {"grouped": 3.0, "loop": 5.0}},
            "cifar10": {"status": "ok", "backend_run_steps_s": {"grouped": 1.0, "loop": 1.0}},
            "svhn": {"status": "skipped", "reason": "time"}}
    import bench_training  # beside the suite, on the path the suite set up

    table = bench_training.measured(rows.values(), "cpu-test")
    assert table == {"cpu-test": {"grouped": 2.0, "loop": 3.0}}
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"training": {"measured": table}}))
    before = {k: dict(v) for k, v in MEASURED.items()}
    assert load_measured(str(path))["cpu-test"] == {"grouped": 2.0, "loop": 3.0}
    assert {k: dict(v) for k, v in MEASURED.items()} == before  # a new table; the built-in stays


def test_error_record_keeps_type_message_and_the_traceback_tail(parts):
    try:
        raise KeyError("missing thing")
    except KeyError as e:
        rec = parts.core.error_record(e, lines=3)
    assert rec["type"] == "KeyError" and "missing thing" in rec["message"]
    assert len(rec["traceback"]) == 3 and "KeyError" in rec["traceback"][-1]


def test_summary_is_short_and_names_gpu_torch_commit_and_each_part(parts):
    res = {"device_name": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "commit": "abc1234",
           "date": "2026-12-04", "budget_s": 420.0, "elapsed_s": 400.0, "status": "failed",
           "parts": {"smoke": {"status": "ok", "seconds": 40.0},
                     "tests": {"status": "failed", "seconds": 50.0,
                               "error": {"type": "TimeoutError"}},
                     "prewarm": {"status": "skipped", "reason": "needs >= 4 s"}},
           "smoke": {"a": {"status": "ok"}, "b": {"status": "ok"}}}
    text = parts.summary.summary(res)
    lines = text.splitlines()
    assert "NVIDIA H200" in lines[0] and "torch 2.11.0" in lines[0] and "abc1234" in lines[0]
    assert "| smoke | ok | 40.0 | 2/2 cases passed |" in text
    assert "| tests | failed: TimeoutError |" in text
    assert "| prewarm | skipped: needs >= 4 s |" in text
    assert len(lines) <= 4 + len(res["parts"]) and max(map(len, lines)) < 300


def test_the_loops_agree_check_fails_on_different_steps_or_centres(parts):
    def fit(steps, shift=0.0):
        return SimpleNamespace(cluster_centers_=torch.zeros(4, 3) + shift, n_steps_=steps)

    agree = parts.smoke._smoke_loops_agree
    assert agree({"device": fit(20), "host": fit(20, 1e-6)})["n_steps"] == 20
    with pytest.raises(AssertionError, match="device loop 20 steps, host loop 21"):
        agree({"device": fit(20), "host": fit(21)})
    with pytest.raises(AssertionError, match="max"):
        agree({"device": fit(20), "host": fit(20, 1e-3)})
    with pytest.raises(RuntimeError, match="only the \\['device'\\] loop"):
        agree({"device": fit(20)})


def test_smoke_trains_every_backend_in_every_precision(parts):
    """The smoke part names a case for each training backend (bmm included) in each precision."""
    from prewarm_gpu.train import BACKENDS, PRECISIONS

    names: list[str] = []
    ctx = SimpleNamespace(dev=torch.device("cpu"), quick=True,
                          case=lambda name, fn, **kw: names.append(name))
    parts.smoke.part_smoke(ctx)
    for backend in BACKENDS:
        for precision in PRECISIONS if backend != "auto" else ("fp32",):
            assert f"train {backend} {precision}" in names


def test_pytest_counts_read_a_cut_verbose_log(parts):
    log = ("tests/test_a.py::test_x PASSED  [ 33%]\ntests/test_a.py::test_y[cuda] FAILED [ 66%]\n"
           "tests/test_b.py::test_z SKIPPED (needs a CUDA device) [100%]\n")
    assert parts.measure._pytest_counts(log) == {"passed": 1, "failed": 1, "skipped": 1}
