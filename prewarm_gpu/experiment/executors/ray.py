"""``--executor ray``: the sweep's groups of runs spread over every GPU (or CPU) of a Ray cluster.

The engine (:func:`..engine.execute`) is unchanged: it plans, groups, and alone writes
``results.jsonl`` as results stream back, so resume, torn-line handling and the tables work as
with the local executor. Each group of stacked runs is one call on a worker; unless
``--group-size`` says otherwise, a dataset's runs are split into at least as many groups as there
are workers, so that every worker has work.

Workers are Ray actors, one per GPU of the cluster (``num_gpus=1``) or, on a CPU device, one per
CPU (``num_cpus=1``, one torch thread each); those that start within :data:`READY_TIMEOUT` s are
used (an actor waits for a device another job holds). Before any training each must run the
driver's version and commit of this package and see every dataset of the sweep where the driver
found it; otherwise the sweep is refused (exit 2).

**Data**: each actor loads a dataset once, on first use, and keeps it for every later group —
rather than passing the images through Ray's object store — because the datasets are small
(Fashion-MNIST's uint8 images are 55 MB; the largest, SVHN, 0.3 GB), a worker then holds them on
its own device once instead of copying them from shared memory for every task, and a worker on
another node reads its own copy from the same path.

**Faults**: an actor whose process dies is restarted and its call retried (``max_restarts``,
``max_task_retries``: :data:`MAX_RETRIES`); a retried group continues from its in-run checkpoint
when one was written. An actor that has used up its restarts is dead for good: its group goes to
another worker (it may never have started), and when no worker is left the sweep stops
(:class:`WorkersLostError`, exit 5) keeping every finished run. A group that fails for its own
reasons (an initialiser's error, a NaN loss) is recorded failed by the worker, as locally. Ctrl-C
on the driver kills the actors; every run recorded so far is kept, and ``--resume`` submits only
what is missing.

Workers write in-run checkpoints and ``--save-models`` files under ``--out`` themselves, and read
``--bank`` files: across several nodes these paths must be on a filesystem they share. Only the
built-in initialisers and models exist on the workers (the package's registry, filled on import).

Install with ``pip install -e ".[ray]"``.
"""
from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ... import __version__
from ...data import DatasetNotFoundError, canonical_name, find_files, load_dataset, locate
from ..errors import ExecutorUnavailableError, WorkersLostError
from ..plan import RunSpec
from ..records import environment, git_commit
from ..units import Job, checkpoint_policy, run_group

MAX_RETRIES = 3  # restarts of a dead actor, and retries of the call it was running
READY_TIMEOUT = 120.0  # seconds for every worker to start and answer


def import_ray():
    """``ray``, or an ``ImportError`` saying how to install the extra."""
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray: pip install 'prewarm-gpu[ray]' (or pip "
                          "install ray)") from None
    return ray


class _Worker:
    """One worker slot: loads each dataset once and trains the groups it is given."""

    def __init__(self, device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.device, self.data = device, {}

    def describe(self, data_dirs: dict[str, str | None]) -> dict[str, Any]:
        """This worker's host, pid, package version and commit, and the datasets of
        ``data_dirs`` it cannot find there."""
        missing = [f"{ds} in {d}" for ds, d in data_dirs.items()
                   if d is not None and find_files(ds, d) is None]
        return {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__,
                "commit": git_commit(), "missing": missing}

    def run(self, job: Job, ds: str, group: list[RunSpec]) -> list[dict[str, Any]]:
        """Train ``group`` (:func:`..units.run_group`); its records, with this worker's
        environment. ``job``'s paths are absolute (the driver's), so the worker's own cwd does not
        matter."""
        if ds not in self.data:
            self.data = {ds: load_dataset(ds, data_dir=job.data_dir, download=False,
                                          device=self.device)}  # one dataset at a time
        records = run_group(job, group, self.data[ds], None, checkpoint_policy(job, group))
        env = environment(self.device)
        env.update(executor="ray", worker_host=socket.gethostname(), worker_pid=os.getpid())
        for rec in records:
            rec["env"] = env
        return records


class RayExecutor:
    """Runs the groups on Ray actors as they free up; yields each group as it finishes."""

    name = "ray"

    def __init__(self, job: Job, log: Callable[[str], None], *, datasets: Sequence[str],
                 address: str | None = None):
        self.ray = ray = import_ray()
        self.job, self.log, self.actors, self.started, self.worker_pids = job, log, [], False, []
        gpu = torch.device(job.device).type == "cuda"
        kind = "GPU" if gpu else "CPU"
        given, address = address, address or os.environ.get("RAY_ADDRESS")
        try:
            if not ray.is_initialized():
                check_reachable(address)
                ray.init(address=given, log_to_driver=False)
                self.started = True
            total = ray.cluster_resources()
        except ConnectionError as e:
            raise ExecutorUnavailableError(
                f"--executor ray: cannot reach the Ray cluster at {address or 'this machine'} "
                f"({e}); start one with `ray start --head`, or pass no --ray-address (and no "
                "RAY_ADDRESS) to start a local Ray; nothing was trained") from None
        n = int(total.get(kind, 0))
        if n < 1:
            self.close()
            raise ExecutorUnavailableError(
                f"--executor ray: the Ray cluster has no {kind} for --device {job.device} "
                f"(its resources: {total}); nothing was trained")
        options = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        worker = ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
                            **options)(_Worker)
        device = "cuda" if gpu else job.device
        self.actors = [worker.remote(device, None if gpu else 1) for _ in range(n)]
        try:
            self._check_workers(datasets)
        except BaseException:
            self.close()
            raise
        log(f"ray: {len(self.actors)} worker(s), one per {kind} (pids "
            f"{' '.join(map(str, self.worker_pids))})")

    def _check_workers(self, datasets: Sequence[str]) -> None:
        """Keep the workers that start within :data:`READY_TIMEOUT` s (an actor waits for a
        {C,G}PU another job holds); each must run this package's version and commit and see every
        dataset where the driver found it. Else :class:`ExecutorUnavailableError`."""
        ray = self.ray
        self.data_dirs = _data_dirs(self.job, datasets)
        dirs = {ds: None if d is None else str(d) for ds, d in self.data_dirs.items()}
        asked = {a.describe.remote(dirs): a for a in self.actors}
        ready, late = ray.wait(list(asked), num_returns=len(asked), timeout=READY_TIMEOUT)
        for ref in late:
            ray.kill(asked[ref])
        self.actors = [asked[ref] for ref in ready]
        if not self.actors:
            raise ExecutorUnavailableError(
                f"--executor ray: no worker started within {READY_TIMEOUT:.0f} s (is every "
                "device taken by another job?); nothing was trained")
        if late:
            self.log(f"ray: {len(late)} worker(s) did not start within {READY_TIMEOUT:.0f} s "
                     f"(devices taken by another job?); going on with {len(ready)}")
        answers = ray.get(ready)
        self.worker_pids = [a["pid"] for a in answers]  # at start (a restarted actor has another)
        mine = git_commit()
        for a in answers:
            where = f"the worker on {a['host']} (pid {a['pid']})"
            if (a["version"], a["commit"]) != (__version__, mine):
                raise ExecutorUnavailableError(
                    f"--executor ray: {where} runs prewarm_gpu {a['version']} at commit "
                    f"{a['commit']}, the driver {__version__} at {mine}: install the same code "
                    "on every node; nothing was trained")
            if a["missing"]:
                raise ExecutorUnavailableError(
                    f"--executor ray: {where} cannot find {', '.join(a['missing'])}, where the "
                    "driver found it: put the data at the same path on every node; nothing "
                    "was trained")

    def group_size(self, n_runs: int) -> int:
        """``--group-size``, but small enough that every worker gets a group."""
        spread = max(1, math.ceil(n_runs / len(self.actors)))
        return spread if self.job.group_size is None else min(self.job.group_size, spread)

    def map(self, ds: str, groups: list[list[RunSpec]], state,
            bar) -> Iterator[tuple[list[RunSpec], list[dict[str, Any]]]]:
        """Give each idle actor the next group; yield ``(group, records)`` as groups end.

        A group whose actor died for good (after :data:`MAX_RETRIES` restarts) goes back to the
        queue for another actor; when none is left, :class:`WorkersLostError`."""
        ray = self.ray
        job = replace(self.job, out=Path(self.job.out).resolve(), data_dir=self.data_dirs[ds])
        state.remote = "Ray workers"
        pending = list(range(len(groups)))
        running: dict[Any, tuple[Any, int]] = {}  # future -> (actor, group index)
        idle = list(self.actors)
        while pending or running:
            while idle and pending:
                actor, i = idle.pop(0), pending.pop(0)
                running[actor.run.remote(job, ds, groups[i])] = (actor, i)
            state.in_flight = [s for _, j in running.values() for s in groups[j]]
            if not running:  # groups left, no actor to run them
                raise WorkersLostError("every Ray worker has died for good")
            [future], _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(future)
            try:
                records = ray.get(future)
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None  # a bug in a worker: its own exception
            except ray.exceptions.RayActorError:
                self.actors.remove(actor)
                pending.insert(0, i)
                self.log(f"ray: a worker died for good ({MAX_RETRIES} restart(s) used up) with "
                         f"{len(groups[i])} run(s) of {ds} ({groups[i][0].label}, …); "
                         f"{len(self.actors)} worker(s) left; the group goes to another")
                continue
            idle.append(actor)
            if bar is not None:
                bar.update(sum(s.train.steps for s in groups[i]))
                bar.set_postfix_str(f"{ds}: ray, {len(self.actors)} worker(s)", refresh=False)
            yield groups[i], records

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False


def _data_dirs(job: Job, datasets: Sequence[str]) -> dict[str, Path | None]:
    """Per dataset, the absolute folder where the driver finds it (downloading it first with
    ``--download``); ``None`` for the bundled digits. Workers read from exactly there."""
    dirs: dict[str, Path | None] = {}
    for ds in datasets:
        if canonical_name(ds) == "digits":
            dirs[ds] = None
            continue
        try:
            dirs[ds] = locate(ds, job.data_dir).resolve()
        except DatasetNotFoundError:
            if not job.download:
                raise
            load_dataset(ds, data_dir=job.data_dir, download=True)
            dirs[ds] = locate(ds, job.data_dir).resolve()
    return dirs


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A ``ConnectionError`` unless ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a TCP
    connection within ``timeout`` s: ``ray.init`` itself retries an unreachable address for
    minutes. ``None`` (a local Ray) and ``auto`` (a running cluster's address file) pass."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"not HOST:PORT, auto, or ray://HOST:PORT: {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {host}:{port} ({e})") from None
