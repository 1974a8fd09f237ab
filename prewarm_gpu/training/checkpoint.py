"""Checkpoints inside training runs: a killed run goes on from its last checkpoint, exactly.

A checkpoint is one ``torch.save`` file holding everything the step loop needs to continue: the
stacked weights and buffers, the optimiser and schedule, each run's data-order generator, the
per-step losses and the curves so far. It is written atomically (a temporary file, fsync, rename),
and the previous one is kept beside it (``.prev``), so a checkpoint that fails to load — half
written by a crash of the file system, truncated, or from another batch — falls back to the
previous one, else to step 0, with a warning. The harness removes them once the runs are recorded.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["Checkpointer", "parse_every"]


def parse_every(text: str | int | None) -> tuple[int | None, float | None]:
    """``--checkpoint-every``: ``"500"`` (steps), ``"10m"`` (minutes), ``"90s"`` (seconds) or
    ``"0"``/``None`` (never) → ``(every_steps, every_seconds)``."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([ms]?)\s*", str(text))
    if not m:
        raise ValueError(f"--checkpoint-every expects steps (500), minutes (10m) or seconds (90s), "
                         f"got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    if value == 0:
        return None, None
    if unit == "":
        if value != int(value):
            raise ValueError(f"--checkpoint-every: a step count must be whole, got {text!r}")
        return int(value), None
    return None, value * (60.0 if unit == "m" else 1.0)


class Checkpointer:
    """Where and how often one batch of runs is checkpointed.

    Args:
        path: the checkpoint file (its folder is created; ``path.prev`` holds the one before).
        fingerprint: what the checkpoint must match to be used (the runs' keys, the protocol): a
            checkpoint of another batch is never loaded.
        every_steps, every_seconds: save when either many steps or seconds have passed since the
            last save (``None``: not by that criterion).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: Any, *,
                 every_steps: int | None = None, every_seconds: float | None = None):
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {every_seconds}")
        self.path = Path(path)
        self.prev = self.path.with_name(self.path.name + ".prev")
        self.fingerprint = fingerprint
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.saved_step: int | None = None  # the step of the last checkpoint written or loaded
        self._last_step, self._last_time = 0, time.monotonic()

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` (a host clock and counter: no device sync)."""
        if self.every_steps is not None and step - self._last_step >= self.every_steps:
            return True
        return (self.every_seconds is not None
                and time.monotonic() - self._last_time >= self.every_seconds)

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write ``state`` as the checkpoint after ``step``, atomically; keep the previous one. A
        failed write (disk full) is a warning: the training goes on, the last good one stays."""
        tmp = self.path.with_name(self.path.name + ".part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save({"fingerprint": self.fingerprint, "step": step, "state": state}, f)
                f.flush()
                os.fsync(f.fileno())
            if self.path.exists():
                os.replace(self.path, self.prev)
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk must not end the training: warn, try again later
            tmp.unlink(missing_ok=True)
            warnings.warn(f"checkpoint at step {step} not written ({e}); training goes on",
                          stacklevel=3)
            self._last_step, self._last_time = step, time.monotonic()
            return
        self.saved_step, self._last_step, self._last_time = step, step, time.monotonic()

    def load(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the newest usable checkpoint, or ``None`` (start at step 0).

        A file that does not load, or that belongs to other runs, is skipped with a warning."""
        for p in (self.path, self.prev):
            if not p.exists():
                continue
            try:
                blob = torch.load(p, map_location="cpu", weights_only=False)
                if not isinstance(blob, dict) or blob.get("fingerprint") != self.fingerprint:
                    raise ValueError("it belongs to other runs or another protocol")
                step, state = int(blob["step"]), blob["state"]
            except Exception as e:  # noqa: BLE001 — any unreadable checkpoint: fall back
                then = "the previous one" if p == self.path and self.prev.exists() else "step 0"
                warnings.warn(f"checkpoint {p} is unusable ({type(e).__name__}: {e}); falling "
                              f"back to {then}", stacklevel=2)
                continue
            self.saved_step, self._last_step, self._last_time = step, step, time.monotonic()
            return step, state
        return None

    def remove(self) -> None:
        """Delete the checkpoint files (the runs are finished and recorded)."""
        for p in (self.path, self.prev, self.path.with_name(self.path.name + ".part")):
            p.unlink(missing_ok=True)
