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
        if not killed:  # the worker that sent this is given the next group as this returns
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

    with pytest.raises(SweepInterrupted, match="2 of 6 runs are finished") as e:
        run_grid(small(out, executor="ray"), after_run=stop)
    assert "In flight on Ray workers: 1 run(s)" in str(e.value)  # the other worker's group
    assert "Not started: 3 run(s)." in str(e.value)
    ran = []
    run_grid(small(out, executor="ray", resume=True), after_run=ran.append)
    assert len(ran) == 4
    assert cells(out) == cells(local_table)


def test_a_worker_dead_for_good_fails_its_group_and_the_others_go_on(tmp_path, local_table,
                                                                      monkeypatch):
    from prewarm_gpu.experiment import ray_executor

    monkeypatch.setattr(ray_executor, "MAX_RETRIES", 0)  # no restart: the first death is final
    out = tmp_path / "dead"
    killed = []

    def kill_a_worker(rec):
        if not killed:  # that worker is given the next group as this returns: it dies under it
            killed.append(rec["env"]["worker_pid"])
            os.kill(rec["env"]["worker_pid"], signal.SIGKILL)

    outcome = run_grid(small(out, executor="ray"), after_run=kill_a_worker)
    recs = read_results(out / "results.jsonl")
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(recs) == 6 and len(failed) == 1 and outcome.failed == 1
    assert "died for good" in failed[0]["error"] and failed[0]["accuracy"] is None
    assert {r["env"]["worker_pid"] for r in recs if r["status"] == "ok"} - set(killed)
    run_grid(small(out, executor="ray", resume=True, retry_failed=True))  # fresh workers
    assert cells(out) == cells(local_table)


def test_when_every_worker_is_dead_the_sweep_stops_and_resumes(tmp_path, local_table,
                                                               monkeypatch):
    from prewarm_gpu.experiment import ray_executor

    monkeypatch.setattr(ray_executor, "MAX_RETRIES", 0)
    made = []
    init = ray_executor.RayExecutor.__init__
    monkeypatch.setattr(ray_executor.RayExecutor, "__init__",
                        lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    out = tmp_path / "all-dead"
    pids = []

    def kill_every_worker(rec):
        if not pids:  # a busy worker answers once its group is done
            pids.extend(ray.get([a.pid.remote() for a in made[-1].actors]))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(ray_executor.WorkersLostError, match=r"run\(s\) of digits were not run"):
        run_grid(small(out, executor="ray"), after_run=kill_every_worker)
    recs = read_results(out / "results.jsonl")
    assert 1 <= len(recs) < 6  # what finished, and the groups the dying workers held, failed
    run_grid(small(out, executor="ray", resume=True, retry_failed=True))
    assert cells(out) == cells(local_table)


def test_a_cluster_without_the_device_is_refused_before_any_training(tmp_path, monkeypatch):
    from prewarm_gpu.experiment import ray_executor

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 1.0})
    out = tmp_path / "none"
    with pytest.raises(ray_executor.ExecutorUnavailableError, match="has no CPU"):
        run_grid(small(out, executor="ray"))
    assert not (out / "results.jsonl").exists() or not read_results(out / "results.jsonl")


def test_workers_write_under_a_relative_out_of_the_driver(tmp_path, monkeypatch):
    from prewarm_gpu.experiment import SweepConfig, reproduce

    monkeypatch.chdir(tmp_path)  # a worker's cwd is not the driver's
    reproduce(SweepConfig(seeds=[1, 2], out="rel", steps=20, save_models=True, batch=False,
                          checkpoint_every="5", executor="ray", progress=False))
    assert len(list((tmp_path / "rel" / "models").glob("*.pt"))) == 4  # the workers wrote them
    assert len(read_results(tmp_path / "rel" / "results.jsonl")) == 4


@pytest.mark.parametrize("address", ["127.0.0.1:1", "localhost", "ray://127.0.0.1:1"])
def test_an_unreachable_cluster_is_refused_at_once(tmp_path, monkeypatch, address):
    from prewarm_gpu.experiment import ray_executor

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh driver
    monkeypatch.setattr(ray, "init", lambda **k: pytest.fail("ray.init despite no cluster"))
    with pytest.raises(ray_executor.ExecutorUnavailableError, match="cannot reach"):
        run_grid(small(tmp_path / "x", executor="ray", ray_address=address))
