"""``--executor ray``: the sweep's groups of runs spread over every GPU (or CPU) of a Ray cluster.

The engine (:func:`.run.execute`) is unchanged: it plans, groups, and alone writes
``results.jsonl`` as results stream back, so resume, torn-line handling and the tables work as
with the local executor. Each group of stacked runs is one call on a worker.

Workers are Ray actors, one per GPU (``num_gpus=1``) or, on a CPU device, one per CPU
(``num_cpus=1``, one torch thread each). **Data**: each actor loads a dataset once, on first use,
and keeps it for every later group — rather than passing the images through Ray's object store —
because the datasets are small (Fashion-MNIST's uint8 images are 55 MB; the largest, SVHN, 0.3
GB), a worker then holds them on its own device once instead of copying them from shared memory
for every task, and a worker on another node reads its own copy of the data from the same path.

**Faults**: an actor whose process dies is restarted and its call retried (``max_restarts``,
``max_task_retries``, default 3); a retried group continues from its in-run checkpoint when one
was written (``<out>/checkpoints`` must then be on a filesystem the workers share). An actor that
has used up its restarts is dead for good: its group is recorded failed (``--retry-failed`` runs it
again) and the other actors go on; when none is left the sweep stops (:class:`WorkersLostError`,
exit 5), keeping every finished run. A group that fails for its own reasons (an initialiser's
error, a NaN loss) is recorded failed by the worker, as locally. Ctrl-C on the driver kills the
actors; every run recorded so far is kept, and ``--resume`` submits only what is missing.

Install with ``pip install -e ".[ray]"``.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..data import canonical_name
from .plan import RunSpec, SweepConfig

MAX_RETRIES = 3


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

    def pid(self) -> int:
        return os.getpid()

    def run(self, config: SweepConfig, ds: str, group: list[RunSpec]) -> list[dict[str, Any]]:
        """Train ``group`` (:func:`.run.run_group`); its records, with this worker's environment.
        ``config``'s paths are absolute (the driver's), so the worker's own cwd does not matter."""
        from ..data import load_dataset
        from .records import environment
        from .run import checkpoint_policy, run_group

        if ds not in self.data:
            self.data = {ds: load_dataset(ds, data_dir=config.data_dir, download=False,
                                          device=self.device)}  # one dataset at a time
        records = run_group(config, group, self.data[ds], None, checkpoint_policy(config, group))
        env = environment(self.device)
        env.update(executor="ray", worker_host=socket.gethostname(), worker_pid=os.getpid())
        for rec in records:
            rec["env"] = env
        return records


class RayExecutor:
    """Runs the groups on Ray actors as they free up; yields each group as it finishes."""

    name = "ray"

    def __init__(self, config: SweepConfig, log: Callable[[str], None]):
        self.ray = import_ray()
        self.log, self.actors, self.started = log, [], False
        gpu = torch.device(config.device).type == "cuda"
        kind = "GPU" if gpu else "CPU"
        try:
            if not self.ray.is_initialized():
                check_reachable(config.ray_address)
                self.ray.init(address=config.ray_address, log_to_driver=False)
                self.started = True
            resources = self.ray.cluster_resources()
        except ConnectionError as e:
            raise ExecutorUnavailableError(
                f"--executor ray: cannot reach the Ray cluster at --ray-address "
                f"{config.ray_address} ({e}); start one with `ray start --head`, or drop "
                "--ray-address to start a local Ray; nothing was trained") from None
        n = int(resources.get(kind, 0))
        if n < 1:
            self.close()
            raise ExecutorUnavailableError(
                f"--executor ray: the Ray cluster has no {kind} for --device {config.device} "
                f"(its resources: {resources}); nothing was trained")
        options = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        worker = self.ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
                                 **options)(_Worker)
        device = "cuda" if gpu else config.device
        self.actors = [worker.remote(device, None if gpu else 1) for _ in range(n)]
        log(f"ray: {n} worker(s), one per {kind}")

    def map(self, config: SweepConfig, ds: str, groups: list[list[RunSpec]],
            state: dict[str, Any], bar) -> Iterator[tuple[list[RunSpec], list[dict[str, Any]]]]:
        """Give each idle actor the next group; yield ``(group, records)`` as groups end.

        A group whose actor died for good (after :data:`MAX_RETRIES` restarts) is recorded failed
        with the error, and the sweep goes on with the other actors; when none is left,
        :class:`WorkersLostError`."""
        ray = self.ray
        config = self.for_workers(config, ds)
        state["remote"] = "Ray workers"
        pending = list(range(len(groups)))
        running: dict[Any, tuple[Any, int, float]] = {}  # future -> (actor, group index, start)
        idle = list(self.actors)
        while pending or running:
            while idle and pending:
                actor, i = idle.pop(0), pending.pop(0)
                running[actor.run.remote(config, ds, groups[i])] = (actor, i, time.time())
            state["in_flight"] = [s for _, j, _ in running.values() for s in groups[j]]
            if not running:  # groups left, no actor to run them
                raise WorkersLostError(
                    f"every Ray worker has died for good; {sum(len(groups[i]) for i in pending)} "
                    f"run(s) of {ds} were not run (--resume runs them)")
            [future], _ = ray.wait(list(running), num_returns=1)
            actor, i, start = running.pop(future)
            try:
                records = ray.get(future)
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None  # a bug in a worker: its own exception
            except ray.exceptions.RayActorError as e:
                self.actors.remove(actor)
                self.log(f"ray: a worker died for good running {len(groups[i])} run(s) of {ds} "
                         f"({MAX_RETRIES} restart(s) used up); they are recorded failed, "
                         f"{len(self.actors)} worker(s) left")
                records = [lost_record(s, e, time.time() - start) for s in groups[i]]
            else:
                idle.append(actor)
            if bar is not None:
                bar.update(sum(s.train.steps for s in groups[i]))
                bar.set_postfix_str(f"{ds}: ray, {len(groups[i])} run(s) done", refresh=False)
            yield groups[i], records

    def for_workers(self, config: SweepConfig, ds: str) -> SweepConfig:
        """``config`` as the workers need it: ``--out`` absolute, and ``--data-dir`` the absolute
        folder where the driver found ``ds`` (downloading it first with ``--download``), so that a
        worker whatever its cwd reads the same files and writes checkpoints to the same place."""
        from ..data import DatasetNotFoundError, load_dataset, locate

        data_dir = config.data_dir
        if canonical_name(ds) != "digits":
            try:
                data_dir = locate(ds, config.data_dir)
            except DatasetNotFoundError:
                if not config.download:
                    raise
                load_dataset(ds, data_dir=config.data_dir, download=True)
                data_dir = locate(ds, config.data_dir)
            data_dir = data_dir.resolve()
            self.log(f"{ds}: the Ray workers read it from {data_dir}")
        return replace(config, out=Path(config.out).resolve(), data_dir=data_dir)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A ``ConnectionError`` unless ``HOST:PORT`` (or ``ray://HOST:PORT``) accepts a TCP
    connection within ``timeout`` s: ``ray.init`` itself retries an unreachable address for
    minutes. ``None`` (a local Ray) and ``auto`` (a running cluster's address file) pass."""
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"not HOST:PORT, auto, or ray://HOST:PORT: {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {host}:{port} ({e})") from None


class ExecutorUnavailableError(RuntimeError):
    """``--executor ray`` could not start: the cluster is unreachable or lacks the device."""


class WorkersLostError(RuntimeError):
    """Every Ray worker died for good with groups left to run; finished runs are kept."""


def lost_record(spec: RunSpec, error: BaseException, seconds: float) -> dict[str, Any]:
    """The failed record of a run whose worker died under it after using up its
    :data:`MAX_RETRIES` restarts (out of host memory, say); ``--resume --retry-failed`` runs it
    again."""
    from ..train import TrainResult
    from .records import make_record

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    result = TrainResult("failed", None, error=f"ray: the worker running this run's group died "
                         f"for good ({MAX_RETRIES} restart(s) used up; {type(error).__name__}: "
                         f"{first})")
    return make_record(spec, result, {}, None, seconds)
