"""``--executor ray`` on a local Ray "cluster" of 2 CPU workers: the same table as the local
executor, workers killed mid-group and for good, an interrupted driver resumed (also by a real
SIGINT to the command), refusals before any training. Skipped without Ray (the ``ray`` extra;
``.ci/run`` installs it)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from prewarm_gpu import cli  # noqa: E402
from prewarm_gpu.experiment import SweepConfig, engine, read_results, reproduce  # noqa: E402
from prewarm_gpu.experiment.errors import SweepInterrupted  # noqa: E402
from prewarm_gpu.experiment.executors import ray as ray_executor  # noqa: E402
from prewarm_gpu.experiment.grid import GridConfig  # noqa: E402
from tests.conftest import interrupt_after, run_grid  # noqa: E402
from tests.test_data import write_mnist  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


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


def busy(pids) -> list[int]:
    """Those of ``pids`` inside a group right now (Ray titles the process ``ray::_Worker.run``)."""
    out = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_Worker.run"):
                out.append(pid)
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    """A process that runs (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.fixture
def executors(monkeypatch):
    """The RayExecutors this test makes (their ``worker_pids``: only this test's workers are
    ever killed, never another Ray job's on the machine)."""
    made = []
    init = ray_executor.RayExecutor.__init__
    monkeypatch.setattr(ray_executor.RayExecutor, "__init__",
                        lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    return made


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


def test_workers_killed_in_the_middle_of_a_group_are_restarted_and_the_table_is_unchanged(
        tmp_path, local_table, executors):
    out = tmp_path / "killed"
    killed, stop = [], threading.Event()

    def killer():  # SIGKILL whichever workers are inside a group once a checkpoint exists
        while not stop.is_set() and not killed:
            if executors and any((out / "checkpoints").glob("*.pt")):
                killed.extend(busy(executors[-1].worker_pids))
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        run_grid(small(out, executor="ray", steps=150, checkpoint_every="20"))
    finally:
        stop.set()
        thread.join()
    recs = read_results(out / "results.jsonl")
    assert killed and len(recs) == 6 and all(r["status"] == "ok" for r in recs)
    assert {r["env"]["worker_pid"] for r in recs} - set(killed)  # restarted processes ran some
    local = tmp_path / "local"
    run_grid(small(local, steps=150))
    assert cells(out) == cells(local)  # retried (from a checkpoint where written): same numbers


def test_an_interrupted_driver_resumes_only_what_is_missing(tmp_path, local_table):
    out = tmp_path / "cut"
    with pytest.raises(SweepInterrupted, match="2 of 6 runs are finished") as e:
        run_grid(small(out, executor="ray"), after_run=interrupt_after(2))
    assert "In flight on Ray workers: 1 run(s)" in str(e.value)  # the other worker's group
    assert "Not started: 3 run(s)." in str(e.value)
    ran = []
    run_grid(small(out, executor="ray", resume=True), after_run=ran.append)
    assert len(ran) == 4
    assert cells(out) == cells(local_table)


def test_a_worker_dead_for_good_hands_its_group_to_another(tmp_path, local_table, monkeypatch):
    monkeypatch.setattr(ray_executor, "MAX_RETRIES", 0)  # no restart: the first death is final
    out = tmp_path / "dead"
    killed = []

    def kill_a_worker(rec):
        if not killed:  # that worker is given the next group as this returns: it dies under it
            killed.append(rec["env"]["worker_pid"])
            os.kill(rec["env"]["worker_pid"], signal.SIGKILL)

    outcome = run_grid(small(out, executor="ray"), after_run=kill_a_worker)
    recs = read_results(out / "results.jsonl")
    assert len(recs) == 6 and outcome.failed == 0 and all(r["status"] == "ok" for r in recs)
    assert {r["env"]["worker_pid"] for r in recs[1:]} - set(killed)
    assert cells(out) == cells(local_table)


def test_when_every_worker_is_dead_the_sweep_stops_and_resumes(tmp_path, local_table,
                                                               monkeypatch, executors):
    monkeypatch.setattr(ray_executor, "MAX_RETRIES", 0)
    out = tmp_path / "all-dead"
    killed = []

    def kill_every_worker(rec):
        if not killed:
            killed.extend(executors[-1].worker_pids)  # idle or inside a group
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(ray_executor.WorkersLostError,
                       match=r"every Ray worker has died for good\. [12] of 6 runs are finished"):
        run_grid(small(out, executor="ray"), after_run=kill_every_worker)
    assert len(killed) == 2 and len(read_results(out / "results.jsonl")) in (1, 2)
    run_grid(small(out, executor="ray", resume=True))
    assert cells(out) == cells(local_table)


def test_a_dataset_splits_into_a_group_per_worker(tmp_path):
    # reproduce stacks a dataset's runs by default; on Ray they are split so both workers train
    out = tmp_path / "spread"
    reproduce(SweepConfig(seeds=[1, 2], out=out, steps=20, executor="ray", progress=False,
                          checkpoint_every="0"))
    recs = read_results(out / "results.jsonl")
    assert len(recs) == 4 and {r["trainer"] for r in recs} == {"batched"}
    assert len({r["env"]["worker_pid"] for r in recs}) == 2


def test_a_cluster_without_the_device_is_refused_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 1.0})
    out = tmp_path / "none"
    with pytest.raises(ray_executor.ExecutorUnavailableError, match="has no CPU"):
        run_grid(small(out, executor="ray"))
    assert not read_results(out / "results.jsonl")


def test_workers_write_and_read_relative_paths_of_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a worker's cwd is not the driver's
    write_mnist(tmp_path / "rel-data", n_train=64, n_test=32)
    reproduce(SweepConfig(datasets=["mnist"], data_dir=Path("rel-data"), seeds=[1, 2],
                          out=Path("rel"), steps=5, batch_size=32, save_models=True, batch=False,
                          checkpoint_every="2", executor="ray", progress=False))
    assert len(list((tmp_path / "rel" / "models").glob("*.pt"))) == 4  # the workers wrote them
    recs = read_results(tmp_path / "rel" / "results.jsonl")
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "no-port"])
def test_an_unreachable_cluster_is_refused_at_once(tmp_path, monkeypatch, address):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh driver
    monkeypatch.setattr(ray, "init", lambda **k: pytest.fail("ray.init despite no cluster"))
    with pytest.raises(ray_executor.ExecutorUnavailableError, match="cannot reach"):
        run_grid(small(tmp_path / "x", executor="ray", ray_address=address))


def test_ray_address_from_the_environment_is_checked_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **k: pytest.fail("ray.init despite no cluster"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    code = cli.main(["grid", "--dataset", "digits", "--executor", "ray", "--n-patches", "10",
                     "--patch-size", "3", "--n-clusters", "16", "--scale", "0.2", "--seeds", "1",
                     "--steps", "50", "--no-progress", "--out", str(tmp_path / "env")])
    assert code == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in capsys.readouterr().err


def test_every_worker_lost_is_exit_5(tmp_path, monkeypatch, capsys):
    def lost(*a, **k):
        raise ray_executor.WorkersLostError("every Ray worker has died for good. 3 of 6 runs …")

    monkeypatch.setattr(engine, "execute", lost)
    code = cli.main(["grid", "--dataset", "digits", "--n-patches", "10", "--patch-size", "3",
                     "--n-clusters", "16", "--scale", "0.2", "--seeds", "1", "--steps", "50",
                     "--no-progress", "--out", str(tmp_path / "lost")])
    assert code == 5 and "every Ray worker has died for good" in capsys.readouterr().err


def test_ctrl_c_on_the_command_keeps_what_finished_and_stops_the_workers(tmp_path):
    out = tmp_path / "sigint"
    argv = [sys.executable, "-m", "prewarm_gpu", "grid", "--dataset", "digits", "--executor",
            "ray", "--n-patches", "10", "25", "--patch-size", "3", "--n-clusters", "16",
            "--scale", "0.2", "--seeds", "1", "2", "3", "4", "--steps", "300", "--no-progress",
            "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            path = out / "results.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    kept = len(read_results(out / "results.jsonl"))
    assert proc.returncode == 130 and 2 <= kept < 12
    assert f"{kept} of 12 runs are finished and kept" in err
    pids = [int(p) for p in re.search(r"one per CPU \(pids ([\d ]+)\)", err)[1].split()]
    time.sleep(2)
    assert len(pids) == 2 and not [p for p in pids if alive(p)]  # the command's workers: gone
