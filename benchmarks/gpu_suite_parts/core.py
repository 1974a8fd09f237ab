"""The suite's machinery: the budget's plan and shares, the result's JSON (rewritten atomically
after every case), a case's isolation and error record, and one part's run."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prewarm_gpu.experiment.records import write_atomic

ROOT = Path(__file__).resolve().parents[2]

PARTS = ("smoke", "tests", "prewarm", "kmeans", "training")  # in order of value
NEEDS_CUDA = {"tests"}
# Seconds each part wants at its full size, and the least in which it does anything useful, per
# (device type, --quick). GPU figures from the H100 run of ../shared/notes/gpu-facts.md (smoke:
# the "under ~60 s"); CPU quick ones measured on the 2-core CPU.
PLAN: dict[tuple[str, bool], dict[str, tuple[float, float]]] = {
    ("cuda", False): {"smoke": (60, 10), "tests": (90, 15), "prewarm": (25, 4),
                      "kmeans": (60, 5), "training": (180, 15)},
    ("cuda", True): {"smoke": (60, 10), "tests": (90, 15), "prewarm": (8, 2), "kmeans": (8, 2),
                     "training": (30, 5)},
    ("cpu", True): {"smoke": (30, 2), "tests": (0, 0), "prewarm": (5, 1), "kmeans": (5, 1),
                    "training": (20, 4)},
}
PLAN[("cpu", False)] = PLAN[("cuda", False)]
RESERVE_S = 1.0  # kept back from the budget for the last JSON write and the summary
SAFETY = 1.5  # a case's estimate: this many times its kind's last measured seconds


def error_record(exc: BaseException, lines: int = 12) -> dict[str, Any]:
    """An exception as JSON: its type, message and the traceback's last ``lines`` lines."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb).rstrip().splitlines()[-lines:]
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": tail}


def part_share(remaining_s: float, wants: list[float]) -> float:
    """Seconds for the next part, given what is left and what it and the later parts want.

    Parts come in order of value: while the budget is short the next part gets all it wants
    (later parts are squeezed or skipped); when there is more than all want, every part's share
    grows in proportion (training, the one part whose size grows with time, then uses it).
    """
    total = sum(wants)
    if remaining_s <= 0:
        return 0.0
    if total <= 0:
        return remaining_s
    return min(remaining_s, wants[0] * max(1.0, remaining_s / total))


# --------------------------------------------------------------------------- the machinery
class SuiteInterrupted(BaseException):
    """SIGTERM: the command's time limit. A BaseException, so no case's ``except Exception``
    takes it for the case's own failure."""


class Suite:
    """The result dict, its JSON file, and the clock every part's share is cut from."""

    def __init__(self, path: Path, result: dict[str, Any], started: float, budget_s: float):
        self.path, self.result, self.started = path, result, started
        self.deadline = started + budget_s - RESERVE_S

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        """Rewrite the JSON atomically (a temporary file, fsync, rename): a kill at any moment
        leaves the previous or this version whole."""
        self.result["elapsed_s"] = round(time.monotonic() - self.started, 3)
        write_atomic(self.path, json.dumps(self.result, indent=2, default=_jsonable))


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return str(x)


class Ctx:
    """One part in progress: its share, its cases (each isolated and saved), its data."""

    def __init__(self, suite: Suite, name: str, dev: torch.device, quick: bool, share_s: float):
        self.suite, self.name, self.dev, self.quick = suite, name, dev, quick
        self.data: dict[str, Any] = suite.result.setdefault(name, {})
        self.ends = time.monotonic() + share_s
        self.last_s: dict[str, float] = {}  # kind → seconds of its last case
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def left(self) -> float:
        """Seconds left of this part's share (never past the suite's deadline)."""
        return min(self.ends, self.suite.deadline) - time.monotonic()

    def estimate(self, kind: str, guess: float) -> float:
        return SAFETY * self.last_s[kind] if kind in self.last_s else guess

    def case(self, name: str, fn: Callable[[], dict | None], *, guess: float,
             kind: str | None = None, into: dict | None = None) -> dict | None:
        """Run ``fn`` as one case: skipped when its estimate does not fit what is left; an
        exception recorded as a failure; the JSON saved after it. Returns its row (None unless
        it passed)."""
        into = self.data if into is None else into
        kind = kind or name
        need, left = self.estimate(kind, guess), self.left()
        if need > left:
            into[name] = {"status": "skipped",
                          "reason": f"would need ~{need:.1f} s; {max(left, 0):.1f} s left of the "
                                    f"{self.name} part's share"}
            self.skipped.append(name)
            self.suite.save()
            _log(f"{self.name} / {name}: skipped ({into[name]['reason']})")
            return None
        t = time.perf_counter()
        try:
            row, status = dict(fn() or {}), "ok"
        except subprocess.TimeoutExpired as e:  # its timeout is what was left of the share
            row, status = {"error": error_record(e, 2)}, "failed"
            if self.left() <= 1.0:  # the budget cut it, not a fault: a skip, as above
                status = "skipped"
                row["reason"] = (f"cut at the end of the {self.name} part's share after "
                                 f"{time.perf_counter() - t:.1f} s")
            (self.skipped if status == "skipped" else self.failed).append(name)
        except Exception as e:  # noqa: BLE001 — recorded; the other cases still run
            row, status = {"error": error_record(e)}, "failed"
            self.failed.append(name)
        except BaseException as e:
            into[name] = {"status": "interrupted", "seconds": time.perf_counter() - t,
                          "error": error_record(e, 4)}
            raise
        seconds = time.perf_counter() - t
        self.last_s[kind] = seconds
        into[name] = {"status": status, "seconds": round(seconds, 4), **row}
        self.suite.save()
        what = status if status != "failed" else f"FAILED {row['error']['type']}: " \
                                                  f"{row['error']['message'][:200]}"
        _log(f"{self.name} / {name}: {what} ({seconds:.2f} s)")
        return row if status == "ok" else None


def _log(msg: str) -> None:
    print(f"[gpu_suite] {msg}", file=sys.stderr, flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _finite_params(model: nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise AssertionError(f"non-finite parameters after the call: {bad}")


def run_part(suite: Suite, name: str, fn: Callable[[Ctx], None], dev: torch.device, quick: bool,
             share_s: float) -> None:
    """Run one part isolated: its exception recorded, its status and seconds saved."""
    rec = suite.result["parts"][name] = {"status": "running", "share_s": round(share_s, 1)}
    suite.save()
    ctx = Ctx(suite, name, dev, quick, share_s)
    t = time.perf_counter()
    try:
        fn(ctx)
        rec["status"] = "failed" if ctx.failed else "ok"
    except Exception as e:  # noqa: BLE001 — recorded; the other parts still run
        rec.update(status="failed", error=error_record(e))
    except BaseException:
        rec["status"] = "interrupted"
        raise
    finally:
        rec["seconds"] = round(time.perf_counter() - t, 3)
        if ctx.failed:
            rec["failed_cases"] = ctx.failed
        if ctx.skipped:
            rec["skipped_cases"] = ctx.skipped
        suite.save()
        _log(f"{name}: {rec['status']} ({rec['seconds']:.1f} s of a {share_s:.0f} s share)")

