"""The local executor: the groups one after another in this process, on the job's device."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from ...data import ImageData
from ..plan import RunSpec
from ..units import Job, checkpoint_policy, load_data, run_group


class LocalExecutor:
    """Runs the groups one after another in this process, on ``job.device`` (the default)."""

    name = "local"

    def __init__(self, job: Job, log: Callable[[str], None]):
        self.job, self.log, self.data = job, log, None

    def group_size(self, n_runs: int) -> int | None:
        """The most runs trained together: ``--group-size`` (None: all of an architecture)."""
        return self.job.group_size

    def load(self, ds: str) -> ImageData:
        """Dataset ``ds``, kept until another is asked for."""
        if self.data is None or self.data.spec.name != ds:
            self.data = None  # free the previous dataset first
            self.data = load_data(self.job, ds)
            if self.data.source is not None:
                self.log(f"{ds}: read from {self.data.source}")
        return self.data

    def map(self, ds: str, groups: list[list[RunSpec]], state,
            bar) -> Iterator[tuple[list[RunSpec], list[dict]]]:
        """Yield ``(group, records)`` as each group finishes; ``state`` says what is in flight."""
        data = self.load(ds)
        update = bar.update if bar is not None else None
        for group in groups:
            ckpt = checkpoint_policy(self.job, group)
            state.in_flight, state.checkpoints = list(group), [ckpt]
            if bar is not None:
                bar.set_postfix_str(group[0].label if len(group) == 1 else
                                    f"{ds}: {len(group)} runs batched", refresh=False)
            yield group, run_group(self.job, group, data, update, ckpt)

    def close(self) -> None:
        self.data = None
