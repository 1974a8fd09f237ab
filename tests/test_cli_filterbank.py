"""`prewarm-gpu filterbank build` from a sweep's saved models, then `--init filterbank --bank`."""

import json

import pytest
import torch

from prewarm_gpu.cli import main


def test_filterbank_build_and_use(tmp_path):
    runs = tmp_path / "runs"
    args = ["reproduce", "--seeds", "1", "2", "--steps", "12", "--eval-points", "1",
            "--no-progress", "--threads", "1"]
    assert main(args + ["--out", str(runs), "--save-models"]) == 0
    assert sorted(p.name for p in (runs / "models").iterdir()) == [
        "digits-kaiming-1.pt", "digits-kaiming-2.pt", "digits-prewarm-1.pt", "digits-prewarm-2.pt"]
    bank = tmp_path / "bank.pt"
    assert main(["filterbank", "build", "--runs", str(runs), "--out", str(bank), "--init",
                 "kaiming", "--variant", "fourier", "--n-clusters", "2"]) == 0
    loaded = torch.load(bank, weights_only=True)
    assert loaded["sources"] == ["digits-kaiming-1.pt", "digits-kaiming-2.pt"]
    out = tmp_path / "fb"
    assert main(args + ["--out", str(out), "--init", "kaiming", "filterbank", "--bank",
                        str(bank)]) == 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["init"] for r in recs} == {"kaiming", "filterbank"}
    assert all(r["status"] == "ok" for r in recs)


def test_filterbank_build_without_models_is_a_clear_error(tmp_path, capsys):
    code = main(["filterbank", "build", "--runs", str(tmp_path), "--out", str(tmp_path / "b.pt")])
    assert code == 2
    assert "no trained models" in capsys.readouterr().err


# --- issue 30 item 6: user errors are exit 2 (or 4), one line, never a traceback ----------------


def _models(runs, seeds=(1, 2)):
    """Tiny saved models as `reproduce --save-models` names them (untrained: only their files
    matter here)."""
    from prewarm_gpu.experiment.arms import seeded_cpu_rng
    from prewarm_gpu.models import build_model

    (runs / "models").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        with seeded_cpu_rng(seed):  # forked: the global RNG is left as it was
            model = build_model("simplecnn", in_channels=1, n_classes=10, image_size=(8, 8))
        torch.save(model.state_dict(), runs / "models" / f"digits-kaiming-{seed}.pt")
    return runs


def _one_line_error(capsys, code, want_code, *says):
    err = capsys.readouterr().err.strip()
    assert code == want_code, err
    assert "Traceback" not in err and "internal error" not in err and "\n" not in err, err
    assert err.startswith("prewarm-gpu: error: ") and all(s in err for s in says), err


def test_filterbank_build_with_more_clusters_than_kernels_is_exit_2(tmp_path, capsys):
    runs, bank = _models(tmp_path / "runs"), tmp_path / "bank.pt"
    code = main(["filterbank", "build", "--runs", str(runs), "--out", str(bank),
                 "--n-clusters", "100000"])
    _one_line_error(capsys, code, 2, "n_clusters=100000", "n_samples=64")
    assert not bank.exists()


def test_filterbank_build_into_an_unwritable_folder_is_exit_4(tmp_path, capsys):
    code = main(["filterbank", "build", "--runs", str(_models(tmp_path / "runs")), "--out",
                 "/proc/bank.pt"])
    _one_line_error(capsys, code, 4, "--out /proc/bank.pt", "cannot be written")


def test_filterbank_build_onto_a_folder_is_exit_2(tmp_path, capsys):
    code = main(["filterbank", "build", "--runs", str(_models(tmp_path / "runs")), "--out",
                 str(tmp_path)])
    _one_line_error(capsys, code, 2, "is a folder")


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_a_garbage_model_file_is_exit_2_naming_it(tmp_path, capsys, content):
    runs = _models(tmp_path / "runs")
    bad = runs / "models" / "digits-kaiming-3.pt"
    bad.write_bytes(content)
    code = main(["filterbank", "build", "--runs", str(runs), "--out", str(tmp_path / "b.pt")])
    _one_line_error(capsys, code, 2, str(bad), "is not a state dict")
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("content", [{"fc.weight": torch.zeros(2, 3)}, {}, {"step": 3}])
def test_a_model_file_with_no_conv_is_exit_2_naming_it(tmp_path, capsys, content):
    """A readable state dict with no conv kernel (a stray .pt among the models) is refused, not
    counted as a model of the bank."""
    runs = _models(tmp_path / "runs")
    bad = runs / "models" / "digits-kaiming-3.pt"
    torch.save(content, bad)
    code = main(["filterbank", "build", "--runs", str(runs), "--out", str(tmp_path / "b.pt")])
    _one_line_error(capsys, code, 2, str(bad), "no conv layer")
    assert not (tmp_path / "b.pt").exists()


def _bank(tmp_path):
    from prewarm_gpu.methods.filterbank import build_bank, save_bank

    runs = _models(tmp_path / "runs")
    path = tmp_path / "bank.pt"
    save_bank(build_bank(sorted((runs / "models").glob("*.pt")), n_clusters=2, generator=0),
              path)
    return path, runs


@pytest.mark.parametrize("which", ["missing", "empty", "garbage", "a state dict", "no bank"])
def test_a_bank_that_is_missing_or_not_a_bank_is_exit_2_before_any_training(tmp_path, capsys,
                                                                            which):
    path, runs = _bank(tmp_path)
    argv = ["reproduce", "--seeds", "1", "--steps", "2", "--eval-points", "1", "--no-progress",
            "--out", str(tmp_path / "o"), "--init", "kaiming", "filterbank"]
    if which == "missing":
        argv += ["--bank", str(tmp_path / "nonexistent.pt")]
        says = ("nonexistent.pt", "No such file")
    elif which == "empty":
        (tmp_path / "empty.pt").write_bytes(b"")
        argv += ["--bank", str(tmp_path / "empty.pt")]
        says = ("empty.pt", "is not a filter bank", "EOFError")
    elif which == "garbage":
        (tmp_path / "g.pt").write_bytes(b"garbage")
        argv += ["--bank", str(tmp_path / "g.pt")]
        says = ("g.pt", "is not a filter bank")
    elif which == "a state dict":
        model = runs / "models" / "digits-kaiming-1.pt"
        argv += ["--bank", str(model)]
        says = (str(model), "is not a filter bank")
    else:
        says = ("--init filterbank needs --bank FILE",)
    code = main(argv)
    _one_line_error(capsys, code, 2, *says)
    assert not (tmp_path / "o").exists()  # nothing trained
    assert path.exists()
