"""``--executor ray`` on a local Ray "cluster" of 2 CPU workers: the same table as the local
executor, a worker killed mid-sweep, an interrupted driver resumed. Skipped without Ray (the
``ray`` extra; ``.ci/run`` installs it)."""

import json
import os
import signal

import pytest

ray = pytest.importorskip("ray")

from prewarm_gpu.experiment import read_results  # noqa: E402
from prewarm_gpu.experiment.grid import GridConfig, run_grid  # noqa: E402
from prewarm_gpu.experiment.run import SweepInterrupted  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # workers train with one thread: the local reference does too
    yield


def small(out, **kw) -> GridConfig:
    base = dict(datasets=["digits"], seeds=[1, 2], out=out, steps=50, patch_size=[3],
                n_clusters=[16], n_patches=[10, 25], scale=[0.2], rule_n_patches=25,
                progress=False, checkpoint_every="0")
    base.update(kw)
    return GridConfig(**base)


def cells(out):
    return json.loads((out / "grid.json").read_text())["cells"]


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    import torch

    torch.set_num_threads(1)
    run_grid(small(out))
    return out


def test_ray_gives_the_local_executors_table(tmp_path, local_table):
    out = tmp_path / "ray"
    table = run_grid(small(out, executor="ray")).table
    assert table == (local_table / "grid.md").read_text().rstrip("\n")
    assert cells(out) == cells(local_table)  # bit-identical on the same device type
    recs = read_results(out / "results.jsonl")
    assert len(recs) == 6 and {r["env"]["executor"] for r in recs} == {"ray"}
    assert len({r["env"]["worker_pid"] for r in recs}) == 2  # both workers took groups


def test_a_killed_worker_is_retried_and_the_table_is_unchanged(tmp_path, local_table):
    out = tmp_path / "killed"
    killed = []

    def kill_a_worker(rec):
        if not killed:  # the worker that sent this has just been given the next group
            killed.append(rec["env"]["worker_pid"])
            os.kill(rec["env"]["worker_pid"], signal.SIGKILL)

    run_grid(small(out, executor="ray"), after_run=kill_a_worker)
    recs = read_results(out / "results.jsonl")
    assert killed and len(recs) == 6 and all(r["status"] == "ok" for r in recs)
    assert cells(out) == cells(local_table)


def test_an_interrupted_driver_resumes_only_what_is_missing(tmp_path, local_table):
    out = tmp_path / "cut"
    seen = []

    def stop(rec):
        seen.append(rec)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted, match="2 of 6 runs are finished"):
        run_grid(small(out, executor="ray"), after_run=stop)
    ran = []
    run_grid(small(out, executor="ray", resume=True), after_run=ran.append)
    assert len(ran) == 4
    assert cells(out) == cells(local_table)
