"""The output folder (``--out``) of a sweep: one writer at a time (its lock), and the checks
made before anything is written there (results already present, nothing to resume, not writable,
no room left)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import NothingToResumeError, ResultsExistError, SweepLockedError
from .records import CHECKPOINTS, LOCK, RESULTS, ResultsWriteError


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/.lock`` (an exclusive ``fcntl`` lock, released by the OS when the process
    ends, so a lock left by a killed process is never stale) for the sweep: one writer per folder.
    The file holds the owner's pid, for the message a second writer gets."""
    import fcntl

    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise locked(out, _owner(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _owner(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


def locked(out: Path, owner: str) -> SweepLockedError:
    """The error a second writer of ``out`` gets, naming the owner's pid."""
    return SweepLockedError(f"{out} is in use by another prewarm-gpu (pid {owner}); wait for it "
                            "to finish, or choose another --out")


def lock_holder(out: Path) -> str | None:
    """The pid written in ``<out>/.lock`` when a live process holds that lock (:func:`sweep_lock`),
    else None; creates nothing. A shared lock is taken and dropped at once to test it, so a sweep
    starting in that instant may see the folder as busy (and say so): never the reverse."""
    import fcntl

    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or unreadable): nobody holds it through this path
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_writable(out: Path, min_free: int = 64 * 2**20) -> None:
    """``--out`` can be created and written, with room left, before any training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as e:
        raise ResultsWriteError(f"--out {out} is not writable ({e.strerror or e}); nothing was "
                                "trained") from e
    free = shutil.disk_usage(out).free
    if free < min_free:
        raise ResultsWriteError(f"--out {out}: only {free / 2**20:.0f} MiB free on its disk "
                                f"(at least {min_free / 2**20:.0f} MiB needed); nothing was "
                                "trained")


def check_out(out: Path, *, resume: bool, report_only: bool) -> None:
    """Results already in ``out`` need ``--resume`` (or ``--report-only``); ``--resume`` needs a
    finished run or a checkpoint there, ``--report-only`` a finished run."""
    path = out / RESULTS
    has_results = path.exists() and path.stat().st_size > 0
    if has_results and not (resume or report_only):
        raise ResultsExistError(
            f"{path} already holds results; pass --resume to complete that sweep (only missing "
            f"runs are run), or choose another --out. Nothing was overwritten.")
    has_checkpoints = any((out / CHECKPOINTS).glob("*.pt"))
    if report_only and not has_results:
        raise NothingToResumeError(f"--report-only: {out} holds no results to report")
    if resume and not has_results and not has_checkpoints:
        raise NothingToResumeError(
            f"--resume: {out} holds no finished run ({RESULTS} is missing or empty) and "
            "no checkpoint, so there is nothing to resume. Check --out, or drop --resume to start "
            "the sweep.")
