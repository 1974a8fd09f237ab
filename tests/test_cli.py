"""The ``prewarm-gpu`` command: arguments, exit codes, messages, a real kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prewarm_gpu import cli
from prewarm_gpu.experiment.report import stats_row
from tests.test_data import write_mnist

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "6", "--eval-points", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_parse_init_options():
    got = cli.parse_init_options(["prewarm.scale=0.25", "prewarm.n_patches=auto",
                                  "lsuv.tol=1e-3", "gabor.x=[1, 2]", "a.flag=true"])
    assert got == {"prewarm": {"scale": 0.25, "n_patches": "auto"}, "lsuv": {"tol": 1e-3},
                   "gabor": {"x": [1, 2]}, "a": {"flag": True}}
    with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
        cli.parse_init_options(["scale=0.2"])


def test_defaults_match_the_paper_and_the_readme():
    args = cli.build_parser().parse_args(["reproduce"])
    cfg = cli._sweep_config(args)
    assert cfg.datasets == ["digits"] and cfg.seeds == [42, 7, 13, 99, 2025, 1, 8, 21]
    assert cfg.inits == ["kaiming", "prewarm"] and cfg.out == Path("runs/digits")
    assert cfg.batch_size == 256 and cfg.aux_weight == 0.3 and cfg.steps is None
    tc = cfg.train_config("digits")
    assert (tc.steps, tc.lr_start, tc.lr_end) == (150, 3e-3, 3e-5)
    all_ = cli._sweep_config(cli.build_parser().parse_args(["reproduce", "--dataset", "all"]))
    assert all_.out == Path("runs/all") and len(all_.datasets) == 5
    assert [all_.train_config(d).lr_start for d in all_.datasets] == [3e-3, 3e-3, 3e-3, 5e-4, 2e-3]
    assert all(all_.train_config(d).steps == 5000 for d in all_.datasets)
    bank = cli._sweep_config(cli.build_parser().parse_args(
        ["reproduce", "--init", "kaiming", "filterbank", "--bank", "b.pt"]))
    assert bank.init_options == {"filterbank": {"bank": "b.pt"}}


def test_reproduce_then_refuse_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reproduce", "--seeds", "42", "7", "--out", str(out), *FAST]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "| Digits (8×8) | prewarm | 2 |" in printed.out
    assert len((out / "results.jsonl").read_text().splitlines()) == 4

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and "--resume" in err

    assert cli.main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "4 of 4 runs already" in captured.err
    assert "| Digits (8×8) | prewarm | 2 |" in captured.out
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["reproduce", "--dataset", "mnist", "--data-dir", str(tmp_path / "d"),
                     "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "d" / "MNIST" / "raw" / "train-images-idx3-ubyte") in err
    assert "--download" in err and not (tmp_path / "o").exists()


def test_unknown_init_lists_the_known_ones(tmp_path, capsys):
    assert cli.main(["reproduce", "--init", "kaiming", "magic", "--out", str(tmp_path)]) == 2
    assert "unknown initializer 'magic'; known:" in capsys.readouterr().err


def test_stats_on_a_hand_built_grayscale_dataset(tmp_path, capsys):
    # A quarter of every image is 255, the rest 0: Otsu separates them, d = 0.25, so eq. 5 gives
    # n_patches = ⌊(32/4)/0.25⌋ = 32; σ = 0.20.
    img = np.zeros((4, 28, 28), dtype=np.uint8)
    img[:, :7, :] = 255
    write_mnist(tmp_path, "MNIST", images=img)
    row = stats_row("mnist", data_dir=tmp_path, download=False, device="cpu")
    assert row["d"] == 0.25 and row["n_patches"] == 32 and row["scale"] == 0.20
    assert 0 < row["otsu_tau"] < 1 and row["fc_dim"] == 3136 and row["paper"] == "58 / 0.20"
    assert cli.main(["stats", "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| MNIST | 1 | 28×28 | 3136 | 0.003→3e-05 |" in out and "| 32 | eq. 5 (Otsu) |" in out


def test_stats_on_digits(capsys):
    assert cli.main(["stats"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(ln for ln in out if ln.startswith("| Digits"))
    assert "| 256 |" in row and "| 0.20 |" in row


def test_module_and_console_entry_points():
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="prewarm-gpu", value="prewarm_gpu.cli:main", group="console_scripts")
    assert ep.load() is cli.main
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'prewarm-gpu = "prewarm_gpu.cli:main"' in pyproject
    r = subprocess.run([sys.executable, "-m", "prewarm_gpu", "reproduce", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--resume" in r.stdout


@pytest.mark.slow
def test_killed_sweep_keeps_finished_runs_and_resume_completes_it(tmp_path):
    out = tmp_path / "run"
    # --no-batch: runs finish one by one, so a kill can land between two of them (batched runs
    # of a dataset finish together; an interrupted batch keeps every earlier finished batch).
    argv = ["reproduce", "--seeds", "42", "7", "--steps", "60", "--eval-points", "2",
            "--no-progress", "--threads", "1", "--no-batch", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "prewarm_gpu", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    kept = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert 2 <= len(kept) < 4 and all(r["status"] == "ok" for r in kept)

    assert cli.main([*argv, "--resume"]) == 0
    recs = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert len(recs) == 4 and len({r["key"] for r in recs}) == 4
    assert recs[: len(kept)] == kept  # the finished runs were not redone


# --- what a new user meets (issue 13) -------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--steps", "-5"),
                                         ("--eval-points", "0"), ("--threads", "0")])
def test_non_positive_counts_are_refused_not_replaced(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", flag, value, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_init_option_typo_is_exit_2_before_any_training(tmp_path, capsys):
    out = tmp_path / "o"
    code = cli.main(["reproduce", "--init-option", "prewarm.scle=0.3", "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "prewarm has no option 'scle' (did you mean 'scale'?)" in err
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_an_unavailable_device_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "o"
    code = cli.main(["reproduce", "--device", "cuda", "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("prewarm-gpu: error: --device cuda: no CUDA device")
    assert "\n" not in err and not out.exists()
    assert cli.main(["stats", "--device", "cuda"]) == 2


def test_resume_of_a_new_folder_is_exit_2(tmp_path, capsys):
    code = cli.main(["reproduce", "--resume", "--out", str(tmp_path / "typo"), *FAST])
    assert code == 2 and "nothing to resume" in capsys.readouterr().err


def test_an_internal_error_keeps_its_traceback_and_exits_3(tmp_path, capsys, monkeypatch):
    from prewarm_gpu.experiment import engine

    def bug(*a, **k):
        return {}["no such key"]

    monkeypatch.setattr(engine, "execute", bug)
    code = cli.main(["reproduce", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback (most recent call last)" in err
    assert "KeyError: 'no such key'" in err and "internal error" in err


def test_an_interrupted_batch_says_exactly_what_was_kept(tmp_path, capsys, monkeypatch):
    from prewarm_gpu.training import loop

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_batched", interrupt)
    code = cli.main(["reproduce", "--seeds", "42", "7", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert code == 130
    assert "0 of 4 runs are finished and kept" in err
    assert "Lost: the 4 runs training together" in err
    assert "every finished run is kept" not in err


def test_threads_default_to_the_usable_cores_and_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    args = cli.build_parser().parse_args(["reproduce", "--device", "cpu"])
    assert cli._threads(args) == 3
    args = cli.build_parser().parse_args(["reproduce", "--threads", "1"])
    assert cli._threads(args) == 1
    out = tmp_path / "o"
    assert cli.main(["reproduce", "--seeds", "42", "--threads", "1", "--out", str(out),
                     *FAST]) == 0
    recs = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert {r["env"]["torch_threads"] for r in recs} == {1}


def test_the_printed_table_states_its_protocol(tmp_path, capsys):
    assert cli.main(["reproduce", "--seeds", "42", "7", "--out", str(tmp_path / "o"),
                     *FAST]) == 0
    out = capsys.readouterr().out
    assert "Digits (8×8): 6 steps, batch 256" in out and "2 seeds (42 7), fp32, device cpu" in out
    assert "baseline torch-default" in out


def test_executor_ray_without_ray_is_exit_2_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "r"
    code = cli.main(["grid", "--dataset", "digits", "--executor", "ray", "--out", str(out),
                     "--n-patches", "10", "--scale", "0.2", "--seeds", "1", *FAST[:2]])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'prewarm-gpu[ray]'" in err and not out.exists()


# --- issue 30: values that would train, then fail or lose the records ---------------------------


def _exit_code(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


@pytest.mark.parametrize("argv, flag, value", [
    (["reproduce", "--target-loss", "nan"], "--target-loss", "nan"),
    (["reproduce", "--target-loss", "inf"], "--target-loss", "inf"),
    (["reproduce", "--target-loss", "0"], "--target-loss", "0"),
    (["reproduce", "--lr-end", "inf"], "--lr-end", "inf"),
    (["reproduce", "--lr-end=-1e-3"], "--lr-end", "-1e-3"),
    (["reproduce", "--lr-start", "nan"], "--lr-start", "nan"),
    (["reproduce", "--lr-start", "0"], "--lr-start", "0"),
    (["reproduce", "--aux-weight", "nan"], "--aux-weight", "nan"),
    (["reproduce", "--aux-weight", "inf"], "--aux-weight", "inf"),
    (["reproduce", "--aux-weight", "-0.5"], "--aux-weight", "-0.5"),
    (["reproduce", "--init-option", "prewarm.scale=NaN"], "prewarm.scale=NaN", "finite"),
    (["reproduce", "--init-option", "prewarm.scale=1e999"], "prewarm.scale=1e999", "finite"),
    (["reproduce", "--init-option", "prewarm.scale=-inf"], "prewarm.scale=-inf", "finite"),
    (["grid", "--dataset", "digits", "--scale", "nan"], "--scale", "nan"),
    (["grid", "--dataset", "digits", "--scale", "0.2", "inf"], "--scale", "inf"),
    (["grid", "--dataset", "digits", "--lr-end", "nan"], "--lr-end", "nan"),
])
def test_non_finite_or_out_of_range_floats_are_exit_2_before_any_training(
        tmp_path, capsys, argv, flag, value):
    out = tmp_path / "o"
    code = _exit_code([*argv, "--seeds", "42", "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and flag in err and value in err, err
    assert "Traceback" not in err and not out.exists()  # nothing trained, nothing written


def test_the_api_refuses_non_finite_protocol_floats_before_training(tmp_path):
    from prewarm_gpu.experiment import SweepConfig, prepare_sweep

    for field_, value in [("target_loss", float("nan")), ("lr_end", float("inf")),
                          ("aux_weight", float("nan")), ("lr_start", float("inf"))]:
        cfg = SweepConfig(seeds=[42], out=tmp_path / field_, **{field_: value})
        with pytest.raises(ValueError, match=f"{field_} .* must be a finite number"):
            prepare_sweep(cfg)
        assert not (tmp_path / field_).exists()


def test_a_non_finite_value_that_reaches_the_results_file_is_written_as_null(tmp_path):
    from prewarm_gpu.experiment import read_results
    from prewarm_gpu.experiment.records import append_result

    path = tmp_path / "results.jsonl"
    rec = {"key": "k", "status": "ok", "accuracy": 0.5, "config": {"lr": float("inf")},
           "curves": {"loss": [1.0, float("nan")]}, "target_loss": float("nan")}
    append_result(path, rec)
    line = path.read_text()
    assert "NaN" not in line and "Infinity" not in line
    (back,) = read_results(path)
    assert back["target_loss"] is None and back["config"]["lr"] is None
    assert back["curves"]["loss"] == [1.0, None] and back["accuracy"] == 0.5


@pytest.mark.parametrize("seed", ["18446744073709551616", str(2**70), "-1"])
def test_seeds_torch_cannot_take_are_exit_2_naming_the_seed_and_the_range(tmp_path, capsys,
                                                                          seed):
    out = tmp_path / "o"
    code = _exit_code(["reproduce", "--seeds", "42", seed, "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and seed in err and "[0, 2**64 - 1]" in err and not out.exists()
    code = _exit_code(["filterbank", "build", "--runs", str(tmp_path), "--out",
                       str(tmp_path / "b.pt"), "--seed", seed])
    assert code == 2 and seed in capsys.readouterr().err


def test_the_largest_seed_is_accepted_and_the_api_refuses_the_next(tmp_path):
    import torch

    from prewarm_gpu.experiment import SweepConfig, plan_runs

    top = 2**64 - 1
    assert cli.build_parser().parse_args(["reproduce", "--seeds", str(top)]).seeds == [top]
    torch.Generator().manual_seed(top)  # torch takes it
    assert [s.seed for s in plan_runs(SweepConfig(seeds=[top]))] == [top, top]
    with pytest.raises(ValueError, match=r"seeds must be ints in \[0, 2\*\*64 - 1\], got "
                                         r"\[18446744073709551616\]"):
        plan_runs(SweepConfig(seeds=[1, 2**64]))


@pytest.mark.parametrize("fault", ["fewer labels", "27x29 images", "label 200", "bad magic"])
@pytest.mark.parametrize("command", ["reproduce", "stats"])
def test_inconsistent_dataset_files_are_exit_2_naming_the_file(tmp_path, capsys, command, fault):
    from tests.test_data import _idx

    data = tmp_path / "data"
    arrays = write_mnist(data, None)
    x, y = arrays["train"]
    labels, images = data / "train-labels-idx1-ubyte", data / "train-images-idx3-ubyte"
    if fault == "fewer labels":
        labels.write_bytes(_idx(y[:-1]))
        bad, says = labels, "holds 11 labels but"
    elif fault == "27x29 images":
        images.write_bytes(_idx(np.zeros((len(x), 27, 29), np.uint8)))
        bad, says = images, "27×29"
    elif fault == "label 200":
        labels.write_bytes(_idx(np.r_[y[:-1], 200].astype(np.uint8)))
        bad, says = labels, "label 200"
    else:
        images.write_bytes(b"\x00\x00\x09\x03" + images.read_bytes()[4:])
        bad, says = images, "magic number 0x00000903"
    out = tmp_path / "o"
    argv = ["--dataset", "mnist", "--data-dir", str(data)]
    if command == "reproduce":
        argv += ["--seeds", "42", "--out", str(out), *FAST]
    code = cli.main([command, *argv])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and says in err, err
    assert "Traceback" not in err and "not found" not in err and "internal error" not in err
    assert not out.exists()  # refused before any training


def test_stats_on_all_zero_images_is_exit_2_naming_the_file(tmp_path, capsys):
    write_mnist(tmp_path, None, images=np.zeros((4, 28, 28), np.uint8))
    code = cli.main(["stats", "--dataset", "mnist", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "train-images-idx3-ubyte") in err
    assert "constant images" in err and "Traceback" not in err


def test_reproduce_on_all_zero_images_is_exit_2_naming_the_file(tmp_path, capsys):
    # The dataset rule (Otsu over the whole training split) refuses them as stats does.
    write_mnist(tmp_path, None, images=np.zeros((4, 28, 28), np.uint8))
    out = tmp_path / "o"
    code = cli.main(["reproduce", "--dataset", "mnist", "--data-dir", str(tmp_path), "--seeds",
                     "42", "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "train-images-idx3-ubyte") in err, err
    assert "constant images" in err and "Traceback" not in err
    assert not out.exists()  # refused before any training


@pytest.mark.parametrize("resume", [True, False])
def test_a_folder_another_live_sweep_holds_names_its_pid_not_nothing_to_resume(tmp_path, capsys,
                                                                              resume):
    out = tmp_path / "o"
    out.mkdir()
    holder = ("import sys; from pathlib import Path; from prewarm_gpu.experiment.folder import "
              "sweep_lock\nwith sweep_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n"
              "    sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "held"  # a sweep that has written nothing yet
        code = cli.main(["reproduce", "--seeds", "42", "--out", str(out), *FAST,
                         *(["--resume"] if resume else [])])
        err = capsys.readouterr().err
        assert code == 2 and f"is in use by another prewarm-gpu (pid {proc.pid})" in err, err
        assert "nothing to resume" not in err
    finally:
        proc.communicate("", timeout=60)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing trained or written
    assert cli.main(["reproduce", "--resume", "--out", str(out), *FAST]) == 2  # lock released:
    assert "nothing to resume" in capsys.readouterr().err  # now it is the folder's state
