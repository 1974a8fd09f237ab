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
    row = cli.stats_row("mnist", data_dir=tmp_path, download=False, device="cpu")
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
