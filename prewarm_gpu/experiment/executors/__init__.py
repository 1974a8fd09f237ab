"""Executors: where a sweep's groups of runs train. An executor is built with the sweep's
:class:`~..units.Job` and has ``group_size(n_runs)``, ``map(ds, groups, state, bar)`` (yielding
``(group, records)`` as each group ends, each group through :func:`~..units.run_group`) and
``close()``; :mod:`.local` trains in this process, :mod:`.ray` on a Ray cluster."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..units import Job

EXECUTORS = ("local", "ray")


def check_executor(name: str, *, needed: bool = True) -> None:
    """``name`` is one of :data:`EXECUTORS` (else a ``ValueError``); with ``needed``, Ray is
    importable for ``ray`` (else an ``ImportError`` naming the extra), before any work."""
    if name not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(map(repr, EXECUTORS))}, "
                         f"got {name!r}")
    if name == "ray" and needed:
        from .ray import import_ray

        import_ray()


def make_executor(name: str, job: Job, log: Callable[[str], None], *,
                  datasets: Sequence[str] = (), ray_address: str | None = None):
    """The executor ``name`` names (checked by :func:`check_executor`): ``local``, or ``ray``
    (the optional extra) joining ``ray_address`` and checking its workers see ``datasets``."""
    if name == "ray":
        from .ray import RayExecutor

        return RayExecutor(job, log, datasets=datasets, address=ray_address)
    from .local import LocalExecutor

    return LocalExecutor(job, log)
