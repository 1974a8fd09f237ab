"""What an interrupted sweep kept and lost: the state the engine and its executor keep while the
sweep runs, and the message :class:`~.errors.SweepInterrupted` (or a lost cluster) carries."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plan import RunSpec
from .records import CHECKPOINTS, RESULTS, is_done, latest_by_key
from .units import CheckpointPolicy


@dataclass
class SweepState:
    """A sweep under way: the engine counts the records it wrote; the executor says which runs are
    in flight, their checkpoint policies, and where they train (``remote``: None in this
    process)."""

    written: int = 0
    in_flight: list[RunSpec] = field(default_factory=list)
    checkpoints: list[CheckpointPolicy | None] = field(default_factory=list)
    remote: str | None = None


def interrupted(specs: Sequence[RunSpec], records: Sequence[dict[str, Any]], state: SweepState,
                out: Path, retry_failed: bool) -> str:
    """What an interruption kept and lost, exactly."""
    latest = latest_by_key(records)
    kept = sum(1 for s in specs if is_done(latest.get(s.key), retry_failed))
    state.in_flight = [s for s in state.in_flight if not is_done(latest.get(s.key), retry_failed)]
    parts = [f"{kept} of {len(specs)} runs are finished and kept in {out / RESULTS} "
             f"({state.written} written by this command)."]
    ckpts = [c for c in state.checkpoints if c is not None]
    if len(ckpts) > 1 or state.remote:  # several groups on workers: their steps unknown here
        return " ".join(parts + _remote(len(specs) - kept, state, out, bool(kept)))
    return " ".join(parts + _local(state.in_flight, ckpts[0] if ckpts else None, bool(kept)))


def _remote(left: int, state: SweepState, out: Path, kept: bool) -> list[str]:
    lost = state.in_flight
    parts = []
    if lost:
        parts.append(f"In flight on {state.remote or 'workers'}: {len(lost)} run(s); those that "
                     f"wrote a checkpoint continue from it in {out / CHECKPOINTS} with --resume, "
                     "the others start again from step 0.")
    if left - len(lost):
        parts.append(f"Not started: {left - len(lost)} run(s).")
    parts.append("Run the same command with --resume to complete the sweep." if kept or lost
                 else "Nothing to resume: run the same command again (without --resume).")
    return parts


def _local(lost: list[RunSpec], ckpt: CheckpointPolicy | None, kept: bool) -> list[str]:
    saved = ckpt.active.saved_step if ckpt is not None and ckpt.active is not None else None
    parts = []
    if lost:
        one = len(lost) == 1
        what = f"the run {lost[0].label}" if one else \
            f"the {len(lost)} runs training together ({lost[0].dataset}, batched)"
        if saved:
            parts.append(f"In flight: {what}; {'its' if one else 'their'} progress up to step "
                         f"{saved} is checkpointed in {ckpt.path}, and --resume continues from "
                         "there.")
        else:
            parts.append(f"Lost: {what}; no checkpoint was written yet (--checkpoint-every), "
                         f"so {'it starts' if one else 'they start'} again from step 0.")
    if kept or saved:
        parts.append("Run the same command with --resume to complete the sweep.")
    else:
        parts.append("Nothing to resume: run the same command again (without --resume).")
    return parts
