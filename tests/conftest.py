import contextlib
import os
from unittest import mock

import numpy as np
import pytest
import torch


def _device() -> str:
    return os.environ.get("TORCH_DEVICE", "cpu")


@pytest.fixture
def device() -> str:
    """The device under test: ``TORCH_DEVICE`` (default cpu)."""
    return _device()


@pytest.fixture(scope="session")
def digits_images() -> torch.Tensor:
    """scikit-learn's bundled handwritten digits as raw [0, 1] images, (1797, 1, 8, 8) float32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)


def interrupt_after(n: int):
    """A hook for :func:`after_each_run` that raises KeyboardInterrupt once ``n`` runs are
    recorded (as a Ctrl-C between two runs would); its ``seen`` lists the records."""
    def hook(rec):
        hook.seen.append(rec)
        if len(hook.seen) == n:
            raise KeyboardInterrupt

    hook.seen = []
    return hook


@contextlib.contextmanager
def after_each_run(hook):
    """Call ``hook(record)`` each time the sweep engine has recorded a run (appended to
    ``results.jsonl``), in the driver, before the next run is recorded or started."""
    from prewarm_gpu.experiment import engine

    real = engine.record_run

    def record(path, spec, rec, *args, **kwargs):
        real(path, spec, rec, *args, **kwargs)
        hook(rec)

    with mock.patch.object(engine, "record_run", record):
        yield


def run_sweep(config, *, log=None, after_run=None) -> str:
    """``reproduce``'s tables, with ``after_run`` (see :func:`after_each_run`) if given."""
    from prewarm_gpu.experiment import reproduce

    with after_each_run(after_run or (lambda rec: None)):
        return reproduce(config, log=log).table


def run_grid(config, *, log=None, after_run=None):
    """``grid``'s outcome, with ``after_run`` (see :func:`after_each_run`) if given."""
    from prewarm_gpu.experiment import grid

    with after_each_run(after_run or (lambda rec: None)):
        return grid.run_grid(config, log=log)


@pytest.fixture
def one_thread():
    """One torch thread: on two shared cores, oversubscribed OpenMP threads crawl."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits through the harness's loader (uint8-like tensors, both splits)."""
    from prewarm_gpu.data import load_dataset

    return load_dataset("digits")


@pytest.fixture
def cached_digits(monkeypatch, digits):
    """The sweep's units load :func:`digits` (this module's copy) instead of reading it again;
    any other dataset name is a test error."""
    from prewarm_gpu.experiment import units

    def load(name, **kwargs):
        assert name == "digits"
        return digits

    monkeypatch.setattr(units, "load_dataset", load)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
