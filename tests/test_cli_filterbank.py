"""`prewarm-gpu filterbank build` from a sweep's saved models, then `--init filterbank --bank`."""

import json

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
