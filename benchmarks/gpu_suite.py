"""Every GPU figure of the project in one command that cannot lose a result.

Run it first on a GPU machine, from the project root, in one command (``docs/gpu.md``)::

    PYTHONPATH=$PWD python3 benchmarks/gpu_suite.py --out "$OUT"              # 420 s budget
    PYTHONPATH=$PWD python3 benchmarks/gpu_suite.py --smoke --out "$OUT"      # every CUDA path once
    python benchmarks/gpu_suite.py --device cpu --quick --out /tmp/suite      # CI

It writes ``gpu-suite-<device>-<date>.json`` (commit it under ``benchmarks/results/``) and prints a
short summary table last (the GPU, torch, the commit, each part's status).

Nothing is lost: each part, and each case inside a part, runs isolated (an exception is recorded
with its type, message and the traceback's last lines, and the rest still runs); the JSON is
rewritten atomically after every case, so a command killed at its time limit leaves everything
finished before it; SIGTERM/Ctrl-C record the case in flight as interrupted and still print the
summary. The exit code is 0 when no part failed, 1 when one did, 128 + signal when interrupted.

``--budget SECONDS`` (default 420, counted from the interpreter's start): the parts run in order
of value, each given a share of what is left (:func:`gpu_suite_parts.core.part_share`); a part
that cannot fit its least useful size is skipped with the reason, and inside a part a case whose
estimate does not fit what is left of the part's share is skipped (cut between cases, never
mid-case, but for a subprocess whose timeout is what is left of the share: cut by it, the case is
skipped too). Rounds, sizes and training steps are chosen from the share.

Parts, in order:
- ``smoke``: every CUDA path of the project once, each case pass/fail with its error:
  ``prewarm_`` grey and colour (auto rules); ``MiniBatchKMeans`` on the device and host loops
  (and that they agree); each batched-training backend (and ``auto``) in each precision for a
  few steps; ``prewarm-gpu reproduce`` on digits, interrupted after its step-10 checkpoint and
  resumed; one related method of each kind (lsuv, datadep, gabor, filterbank, lion_dg).
- ``tests``: ``pytest -m gpu`` with ``TORCH_DEVICE`` set (CUDA only), cut at its share.
- ``prewarm``: ``prewarm_`` on the colour (256×3×32×32, P = 28) and grey (256×1×28×28, P = 58)
  batches, each loop: the first call in the process for its shape, the median of warm calls
  (synchronised, one seed per round), and per call the host syncs (CUDA's sync debug mode; on the
  CPU the dispatch counter), ATen ops, and kernels launched (``torch.profiler``, kernels only:
  :func:`gpu_suite_parts.measure.count_device_events`).
- ``kmeans``: ``MiniBatchKMeans`` against scikit-learn's on blobs of 7168×27 (k 16), 100k×27 (16),
  1M×27 (64), 1M×147 (64), each one's inertia as a ratio to the true centres' inertia.
- ``training``: ``bench_training.py`` per dataset (the ``measured`` table that
  ``prewarm_gpu.train.load_measured`` reads), steps sized from the share.
"""

from __future__ import annotations

import time

_STARTED = time.monotonic()  # the budget counts the imports too: torch alone takes seconds

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_suite_parts.core import (  # noqa: E402
    NEEDS_CUDA,
    PARTS,
    PLAN,
    Ctx,
    Suite,
    SuiteInterrupted,
    _device_name,
    _log,
    error_record,
    part_share,
    run_part,
)
from gpu_suite_parts.measure import part_kmeans, part_prewarm, part_tests  # noqa: E402
from gpu_suite_parts.smoke import part_smoke  # noqa: E402
from gpu_suite_parts.summary import summary  # noqa: E402
from gpu_suite_parts.training import part_training  # noqa: E402

from prewarm_gpu.experiment.records import git_commit  # noqa: E402

PART_FNS: dict[str, Callable[[Ctx], None]] = {
    "smoke": part_smoke, "tests": part_tests, "prewarm": part_prewarm, "kmeans": part_kmeans,
    "training": part_training}


def _on_sigterm(signum, frame):
    raise SuiteInterrupted(f"signal {signum}")


def _parse_args(argv) -> tuple[argparse.Namespace, torch.device, list[str]]:
    """The command line, checked: its arguments, the device, and the parts to run in order."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds (CI)")
    p.add_argument("--smoke", action="store_true", help="only the smoke part")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds the whole suite may take, imports included (default 420)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for the JSON")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    dev = torch.device(args.device)
    if dev.type not in ("cuda", "cpu"):
        p.error(f"--device must be a cuda or cpu device, got {args.device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    parts = ["smoke"] if args.smoke else [x for x in PARTS if x in args.parts]
    return args, dev, parts


def _new_result(args: argparse.Namespace, dev: torch.device, argv) -> dict:
    """The JSON's head: the machine, the versions, the commit and the command line."""
    return {"suite": "benchmarks/gpu_suite.py", "status": "running",
            "device_name": _device_name(dev), "device": str(dev),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "cuda": torch.version.cuda if dev.type == "cuda" else None,
            "commit": git_commit(), "python": platform.python_version(),
            "argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
            "budget_s": args.budget, "parts": {}}


def _json_path(result: dict, out: Path, quick: bool) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", result["device_name"].lower()).strip("-")[:40]
    out.mkdir(parents=True, exist_ok=True)
    return out / f"gpu-suite-{slug}-{result['date']}{'-quick' if quick else ''}.json"


def _run_parts(suite: Suite, parts: list[str], dev: torch.device, quick: bool) -> None:
    """Each part in order, given its share of what is left, or skipped with the reason."""
    result, plan = suite.result, PLAN[(dev.type, quick)]
    for i, name in enumerate(parts):
        if name in NEEDS_CUDA and dev.type != "cuda":
            result["parts"][name] = {"status": "skipped", "reason": "needs CUDA",
                                     "seconds": 0.0}
            suite.save()
            continue
        want, least = plan[name]
        left = suite.left()
        if left < least:
            result["parts"][name] = {"status": "skipped", "seconds": 0.0,
                                     "reason": f"needs >= {least:.0f} s; "
                                               f"{max(left, 0):.0f} s of the budget left"}
            suite.save()
            _log(f"{name}: skipped ({result['parts'][name]['reason']})")
            continue
        later = [plan[x][0] for x in parts[i:] if x not in NEEDS_CUDA or dev.type == "cuda"]
        run_part(suite, name, PART_FNS[name], dev, quick, part_share(left, later))


def main(argv=None, started: float | None = None) -> int:
    """Run the suite; returns the exit code (0: no part failed; 1: one did; 128+n: signal n)."""
    args, dev, parts = _parse_args(argv)
    started = time.monotonic() if started is None else started
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # initialise CUDA outside every timing
    result = _new_result(args, dev, argv)
    path = _json_path(result, Path(args.out), args.quick)
    suite = Suite(path, result, started, args.budget)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    code = 0
    try:
        _run_parts(suite, parts, dev, args.quick)
        failed = [n for n, r in result["parts"].items() if r["status"] == "failed"]
        result["status"] = "failed" if failed else "ok"
        code = 1 if failed else 0
    except (KeyboardInterrupt, SuiteInterrupted) as e:
        result["status"] = "interrupted"
        result["interrupted"] = error_record(e, 4)
        for name in parts:
            result["parts"].setdefault(name, {"status": "skipped", "reason": "interrupted"})
        code = 128 + (signal.SIGTERM if isinstance(e, SuiteInterrupted) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)
        suite.save()
    _log(f"wrote {path}")
    print(summary(result), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(started=_STARTED))
