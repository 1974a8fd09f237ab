"""The paper's own data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.

Skipped when the package is absent (``apt-get install dataset-fashion-mnist`` puts the four idx
``.gz`` files flat in ``/usr/share/datasets/fashion-mnist``); ``.ci/run`` installs it when it can.
"""

import json

import pytest
import torch

from prewarm_gpu import data as D
from prewarm_gpu.data.files import SYSTEM_DATA_DIR
from prewarm_gpu.experiment import SweepConfig, engine, units
from prewarm_gpu.experiment.plan import plan_runs
from prewarm_gpu.experiment.report import stats_row
from tests.conftest import run_sweep

FASHION = SYSTEM_DATA_DIR / "fashion-mnist"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(D.find_files("fashion-mnist", FASHION) is None,
                       reason=f"Fashion-MNIST not installed in {FASHION} "
                       "(apt-get install dataset-fashion-mnist)"),
]


@pytest.fixture(scope="module")
def fashion():
    return D.load_dataset("fashion-mnist", data_dir=FASHION)


def test_splits_are_60000_and_10000_with_ten_balanced_classes(fashion):
    assert fashion.train_x.shape == (60000, 1, 28, 28)
    assert fashion.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(fashion.train_y).tolist() == [6000] * 10
    assert torch.bincount(fashion.test_y).tolist() == [1000] * 10
    assert fashion.source == FASHION


def test_stats_give_table_1s_row_exactly(fashion, monkeypatch, capsys):
    monkeypatch.setattr(D, "load_dataset", lambda *a, **k: fashion)
    row = stats_row("fashion-mnist", data_dir=None, download=False, device="cpu")
    assert f"{row['otsu_tau']:.4f}" == "0.3809"
    assert f"{row['d']:.4f}" == "0.3602"
    assert row["n_patches"] == 22 and row["scale"] == pytest.approx(0.20)
    assert row["paper"] == "22 / 0.20"


def test_a_short_paired_training_on_the_real_data_learns(fashion, tmp_path, monkeypatch,
                                                          one_thread):

    monkeypatch.setattr(units, "load_dataset", lambda *a, **k: fashion)
    config = SweepConfig(datasets=["fashion-mnist"], seeds=[42], out=tmp_path, steps=200,
                         eval_points=1, loss_points=4, progress=False, data_dir=FASHION)
    run_sweep(config, log=lambda s: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    m = summary["datasets"]["fashion-mnist"]["methods"]["prewarm"]
    assert m["seeds"] == [42]
    assert m["kaiming_acc"][0] >= 0.80 and m["method_acc"][0] >= 0.80


def test_every_prewarm_arm_of_a_fashion_mnist_sweep_gets_table_1s_22(fashion, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(units, "load_dataset", lambda *a, **k: fashion)
    # the committed run's protocol (--no-batch: the single-run trainer, channels_last)
    config, specs = engine.prepare(SweepConfig(datasets=["fashion-mnist"], out=tmp_path,
                                               data_dir=FASHION, progress=False, batch=False),
                                   plan_runs)
    prewarm = [s for s in specs if s.init == "prewarm"]
    assert len(prewarm) == 8 and {dict(s.options)["n_patches"] for s in prewarm} == {22}
    assert {s.rule["n_patches"] for s in prewarm} == {22}
    assert f"{config.dataset_rules['fashion-mnist']['statistic']:.4f}" == "0.3602"
    assert all(s.key.endswith("b98be3227522") for s in specs if s.init == "kaiming")
