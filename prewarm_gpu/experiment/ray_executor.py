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
was written (``<out>/checkpoints`` must then be on a filesystem the workers share). A group that
fails for its own reasons is recorded failed by the worker, as locally. Ctrl-C on the driver kills
the actors; every run recorded so far is kept, and ``--resume`` submits only what is missing.

Install with ``pip install -e ".[ray]"``.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch

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

    def run(self, config: SweepConfig, ds: str, index: int,
            group: list[RunSpec]) -> tuple[int, list[dict[str, Any]]]:
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
        return index, records


class RayExecutor:
    """Runs the groups on Ray actors as they free up; yields each group as it finishes."""

    name = "ray"

    def __init__(self, config: SweepConfig, log: Callable[[str], None]):
        self.ray = import_ray()
        self.log, self.actors, self.started = log, [], False
        if not self.ray.is_initialized():
            self.ray.init(address=config.ray_address, log_to_driver=False)
            self.started = True
        gpu = torch.device(config.device).type == "cuda"
        resources = self.ray.cluster_resources()
        n = int(resources.get("GPU" if gpu else "CPU", 0))
        if n < 1:
            raise RuntimeError(f"the Ray cluster has no {'GPU' if gpu else 'CPU'} for "
                               f"--device {config.device} (resources: {resources})")
        options = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        worker = self.ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES,
                                 **options)(_Worker)
        device = "cuda" if gpu else config.device
        self.actors = [worker.remote(device, None if gpu else 1) for _ in range(n)]
        log(f"ray: {n} worker(s), one per {'GPU' if gpu else 'CPU'}")

    def map(self, config: SweepConfig, ds: str, groups: list[list[RunSpec]],
            state: dict[str, Any], bar) -> Iterator[tuple[list[RunSpec], list[dict[str, Any]]]]:
        """Submit every group (at most one queued per actor at a time); yield them as they end."""
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        state["remote"] = "Ray workers"
        state["in_flight"] = [s for g in groups for s in g]
        for i, group in enumerate(groups):
            pool.submit(lambda a, v: a.run.remote(config, ds, v[0], v[1]), (i, group))
        while pool.has_next():
            try:
                i, records = pool.get_next_unordered()
            except self.ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None  # a bug in a worker: its own exception
            if bar is not None:
                bar.update(sum(s.train.steps for s in groups[i]))
                bar.set_postfix_str(f"{ds}: ray, {len(groups[i])} run(s) done", refresh=False)
            yield groups[i], records

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False
