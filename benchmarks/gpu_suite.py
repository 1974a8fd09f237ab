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
of value, each given a share of what is left (:func:`part_share`); a part that cannot fit its
least useful size is skipped with the reason, and inside a part a case whose estimate does not
fit what is left of the part's share is skipped (cut between cases, never mid-case, but for a
subprocess whose timeout is what is left of the share: cut by it, the case is skipped too). Rounds,
sizes and training steps are chosen from the share.

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
  :func:`count_device_events`).
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
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prewarm_gpu import MiniBatchKMeans, prewarm_  # noqa: E402
from prewarm_gpu.counters import count_dispatch  # noqa: E402
from prewarm_gpu.experiment.records import git_commit, write_atomic  # noqa: E402

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
KMEANS_SIZES = [(7168, 27, 16), (100_000, 27, 16), (1_000_000, 27, 64), (1_000_000, 147, 64)]
QUICK_KMEANS_SIZES = [(7168, 27, 16), (20_000, 27, 16)]
# One fit's seconds (ours, scikit-learn's) on the H100 machine, for a first estimate of a size.
KMEANS_GUESS_S = {7168: (0.07, 0.07), 20_000: (0.1, 0.1), 100_000: (0.15, 0.4),
                  1_000_000: (3.0, 18.0)}
TRAIN_DATASETS = ["cifar10", "mnist", "fashion-mnist", "svhn", "cifar100"]  # gpu-facts' first


# --------------------------------------------------------------------------- small pure helpers
def error_record(exc: BaseException, lines: int = 12) -> dict[str, Any]:
    """An exception as JSON: its type, message and the traceback's last ``lines`` lines."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb).rstrip().splitlines()[-lines:]
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": tail}


def device_event_kind(event) -> str:
    """``"kernel"``, ``"memcpy"``, ``"memset"`` or ``"other"`` for one profiler event on a device.

    Reads Kineto's activity type where the event carries one (``FunctionEvent.activity_type``:
    ``"kernel"``, ``"gpu_memcpy"``, ``"gpu_memset"``, …), else the name Kineto gives copies and
    fills (``"Memcpy HtoD (Pageable -> Device)"``, ``"Memset (Device)"``); any other device event
    of such a torch is a kernel.
    """
    kind = getattr(event, "activity_type", None)
    if kind:
        return {"kernel": "kernel", "gpu_memcpy": "memcpy", "gpu_memset": "memset"}.get(kind,
                                                                                       "other")
    name = str(getattr(event, "name", ""))
    if name.startswith("Memcpy"):
        return "memcpy"
    if name.startswith("Memset"):
        return "memset"
    return "kernel"


def count_device_events(events: Iterable) -> dict[str, int]:
    """Counts by :func:`device_event_kind` of the events on a CUDA device (``prof.events()``).

    ``kernel`` is the number of kernels launched: copies and fills (a host read of a device value
    is one ``Memcpy DtoH``) are counted apart, as are CPU-side events (``cudaLaunchKernel``).
    """
    counts = {"kernel": 0, "memcpy": 0, "memset": 0, "other": 0}
    for e in events:
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            counts[device_event_kind(e)] += 1
    return counts


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


def training_sizes(allow_s: float, cost: dict[str, float], *, max_compare: int = 100,
                   max_sweep: int = 1000, min_compare: int = 10) -> tuple[int, int] | None:
    """``(compare_steps, sweep_steps)`` of one ``bench_training`` dataset that fit ``allow_s``.

    ``cost``: seconds as ``overhead + per_compare·C + per_sweep·S`` (the sweep is extra only when
    S > C). The side-by-side comparison is filled first (the ``measured`` table), then the sweep;
    ``None`` when even ``min_compare`` steps do not fit.
    """
    o, a, b = cost["overhead"], cost["per_compare"], cost["per_sweep"]
    c = int((allow_s - o) / a) if a > 0 else max_compare
    if c < min_compare:
        return None
    c = min(c, max_compare)
    left = allow_s - o - a * c
    s = int(left / b) if b > 0 else max_sweep
    s = min(s, max_sweep)
    return (c, s) if s >= 2 * c else (c, c)  # a sweep no longer than the comparison adds little


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


# --------------------------------------------------------------------------- counting
def count_syncs_and_launches(fn, dev: torch.device) -> dict:
    """Host syncs, ATen ops and (CUDA) kernels launched by one call of ``fn``."""
    if dev.type != "cuda":
        with count_dispatch() as c:
            fn()
        return {"host_syncs": c.n_syncs, "aten_ops": c.n_ops}
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            _sync(dev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    out["host_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    with count_dispatch() as c:
        fn()
    out["aten_ops"] = c.n_ops
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(dev)
        counts = count_device_events(prof.events())
        out["kernel_launches"] = counts["kernel"]
        out["device_events"] = counts
    except Exception as e:  # noqa: BLE001 — the profiler is optional: say why the count is missing
        out["kernel_launches"] = None
        out["kernel_launches_error"] = repr(e)
    return out


# --------------------------------------------------------------------------- smoke
def _tiny_data(name: str, dev: torch.device, n_train: int = 256, n_test: int = 128):
    import bench_training

    return bench_training.synthetic(name, n_train, n_test, str(dev))


def _simplecnn(data, seed: int, arch: str = "simplecnn") -> nn.Module:
    """A model whose weights come from ``seed`` alone: built under a forked CPU RNG (the
    constructor's default draw leaks nothing, and no CUDA generator is touched), then redrawn
    He-normal from a CPU generator."""
    from prewarm_gpu.models import build_model, reinit_

    s = data.spec
    with torch.random.fork_rng(devices=[]):
        m = build_model(arch, in_channels=s.in_channels, n_classes=s.n_classes,
                        image_size=s.image_size)
    reinit_(m, "he-normal", generator=torch.Generator().manual_seed(seed))
    return m.to(data.device)


def _batch(data, n: int = 128) -> dict[str, torch.Tensor]:
    x = data.train_x[:n]
    return {"images": data.standardise(x), "raw": data.raw(x)}


def _smoke_prewarm(data) -> dict:
    model = _simplecnn(data, 0)
    before = model.conv1.weight.detach().clone()
    b = _batch(data)
    r = prewarm_(model, b["images"], raw_images=b["raw"], generator=0)
    _sync(data.device)
    _finite_params(model)
    if torch.equal(before, model.conv1.weight):
        raise AssertionError("prewarm_ left conv1 unchanged")
    return {"n_clusters": r.n_clusters, "n_patches": r.n_patches, "rule": r.rule,
            "scale": r.scale, "kmeans_steps": r.kmeans_steps}


def _smoke_kmeans(dev: torch.device, loop: str, fits: dict) -> dict:
    X, _ = _blobs(4096, 27, 16)
    km = MiniBatchKMeans(16, loop=loop, random_state=0).fit(X.to(dev))
    if km.cluster_centers_.device.type != dev.type or not math.isfinite(km.inertia_):
        raise AssertionError(f"centres on {km.cluster_centers_.device}, inertia {km.inertia_}")
    fits[loop] = km
    return {"inertia": km.inertia_, "n_steps": km.n_steps_, "n_iter": km.n_iter_}


def _smoke_loops_agree(fits: dict) -> dict:
    """The device and host loops run the same steps to the same result (their docstring)."""
    if set(fits) != {"device", "host"}:
        raise RuntimeError(f"only the {sorted(fits)} loop(s) passed")
    d, h = fits["device"], fits["host"]
    diff = float((d.cluster_centers_ - h.cluster_centers_).abs().max())
    if d.n_steps_ != h.n_steps_ or diff > 1e-4:
        raise AssertionError(f"device loop {d.n_steps_} steps, host loop {h.n_steps_}; "
                             f"max |Δcentre| {diff:.3g} (expected the same steps, ≤ 1e-4)")
    return {"n_steps": d.n_steps_, "max_abs_centre_diff": diff}


def _smoke_train(data, backend: str, precision: str, steps: int = 3,
                 compile: bool = False) -> dict:
    from prewarm_gpu.train import TrainConfig, choose_backend, train_batched

    models = [_simplecnn(data, s) for s in (0, 1)]
    cfg = TrainConfig(steps=steps, batch_size=32, lr_start=data.spec.lr_start,
                      lr_end=data.spec.lr_end, eval_points=1, loss_points=2)
    res = train_batched(models, data, cfg, seeds=[0, 1], precision=precision, backend=backend,
                        compile=compile)
    bad = [(r.status, r.error) for r in res if r.status != "ok" or not all(map(math.isfinite,
                                                                               r.loss))]
    if bad:
        raise AssertionError(f"runs failed or lost non-finite: {bad}")
    for m in models:
        _finite_params(m)
    out = {"loss": [r.loss[-1] for r in res], "accuracy": [r.accuracy for r in res]}
    if backend == "auto":
        out["chosen"] = choose_backend("auto", models, data.device)
    return out


_KILL_AT = """
import sys
from prewarm_gpu import cli
from prewarm_gpu.experiment import engine

class Bar:  # interrupts the sweep (as Ctrl-C would) once `at` run-steps are reported
    n = 0
    def update(self, n):
        self.n += n
        if self.n >= int(sys.argv[1]):
            raise KeyboardInterrupt
    def set_postfix_str(self, *a, **k): pass
    def close(self): pass

engine._progress_bar = lambda total, enabled: Bar()
sys.exit(cli.main(sys.argv[2:]))
"""


def _reproduce(argv: list[str], cwd: Path, timeout: float, kill_at: int | None = None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "prewarm_gpu", *argv] if kill_at is None else \
        [sys.executable, "-c", _KILL_AT, str(kill_at), *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=max(timeout, 1.0))


def _smoke_cli(ctx: Ctx, steps: int = 20, every: int = 10, cut_at: int = 15) -> dict:
    """``prewarm-gpu reproduce`` on digits: interrupted after the step-``every`` checkpoint
    (a deterministic stop: a timed kill misses a 20-step run on a GPU), then ``--resume`` from
    it; without ``--quick`` also an uninterrupted run, to compare the records."""
    seeds = ["42"]
    runs = 2 * len(seeds)  # the two arms
    common = ["reproduce", "--dataset", "digits", "--steps", str(steps), "--seeds", *seeds,
              "--eval-points", "2", "--checkpoint-every", str(every), "--device", str(ctx.dev)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-cli-") as tmp:
        tmp = Path(tmp)
        cut = _reproduce([*common, "--out", str(tmp / "cut")], tmp, ctx.left(), runs * cut_at)
        out["interrupted_exit"] = cut.returncode
        if cut.returncode != 130 or "checkpointed" not in cut.stderr:
            raise AssertionError(f"the interrupted run exited {cut.returncode} without a "
                                 f"checkpoint message: {cut.stderr[-1500:]}")
        out["checkpoint_message"] = next(
            (ln.strip() for ln in cut.stderr.splitlines() if "checkpointed" in ln), "")[:300]
        res = _reproduce([*common, "--out", str(tmp / "cut"), "--resume", "--no-progress"], tmp,
                         ctx.left())
        out["resume_exit"] = res.returncode
        if res.returncode != 0:
            raise AssertionError(f"--resume exited {res.returncode}: {res.stderr[-1500:]}")
        recs = [json.loads(ln) for ln in (tmp / "cut" / "results.jsonl").read_text().splitlines()]
        if len(recs) != runs or any(r["status"] != "ok" for r in recs):
            raise AssertionError(f"after --resume: {len(recs)} records of {runs}, statuses "
                                 f"{[r['status'] for r in recs]}")
        out["accuracy"] = {r["key"]: r["accuracy"] for r in recs}
        if not ctx.quick:
            ref = _reproduce([*common, "--out", str(tmp / "ref"), "--no-progress"], tmp,
                             ctx.left())
            if ref.returncode != 0:
                raise AssertionError(f"the uninterrupted run exited {ref.returncode}: "
                                     f"{ref.stderr[-1500:]}")
            refs = [json.loads(ln)
                    for ln in (tmp / "ref" / "results.jsonl").read_text().splitlines()]
            # Bit-identical is promised on the CPU only (cuDNN may pick non-deterministic
            # algorithms): recorded, not asserted.
            out["resumed_equals_uninterrupted"] = \
                {r["key"]: r["accuracy"] for r in refs} == out["accuracy"]
    return out


def _smoke_method(data, name: str) -> dict:
    from prewarm_gpu import registry
    from prewarm_gpu.experiment.arms import init_with_generator

    fn = registry.get(name)
    model = _simplecnn(data, 0, getattr(fn, "requires_model", None) or "simplecnn")
    # datadep's own k-means and rescaling rounds at their smallest: the CUDA path is the same.
    options: dict[str, Any] = {"max_samples": 2000, "max_rounds": 2} if name == "datadep" else {}
    if name == "filterbank":
        from prewarm_gpu.methods.filterbank import build_bank

        sources = [_simplecnn(data, s).cpu().state_dict() for s in (1, 2)]
        options["bank"] = build_bank(sources, generator=0)
    # The harness's own call: refuses an initialiser that draws from a global (CPU or CUDA) RNG.
    report = init_with_generator(fn, model, _batch(data, 64), 0, options, data.device)
    _sync(data.device)
    _finite_params(model)
    return {"report_keys": sorted(report)[:12]}


def part_smoke(ctx: Ctx) -> None:
    dev, cuda = ctx.dev, ctx.dev.type == "cuda"
    g = 1.0 if cuda else 2.0  # first guesses; later cases of a kind use the last one measured
    grey, colour = _tiny_data("mnist", dev), _tiny_data("cifar10", dev)
    small = _tiny_data("digits", dev)  # 8×8: the same CUDA paths as 28×28, at a fraction of it
    ctx.case("prewarm_ grey (auto rules)", lambda: _smoke_prewarm(grey), kind="prewarm",
             guess=3 * g)
    ctx.case("prewarm_ colour (auto rules)", lambda: _smoke_prewarm(colour), kind="prewarm",
             guess=3 * g)
    fits: dict[str, MiniBatchKMeans] = {}
    for loop in ("device", "host"):
        ctx.case(f"kmeans loop={loop}", lambda loop=loop: _smoke_kmeans(dev, loop, fits),
                 kind="kmeans", guess=g)
    ctx.case("kmeans loops agree", lambda: _smoke_loops_agree(fits), guess=0.1)
    from prewarm_gpu.train import BACKENDS, PRECISIONS

    for backend in (*(b for b in BACKENDS if b != "auto"), "auto"):  # every backend, auto last
        for precision in PRECISIONS if backend != "auto" else ("fp32",):
            ctx.case(f"train {backend} {precision}",
                     lambda b=backend, p=precision: _smoke_train(small, b, p), kind="train",
                     guess=5 * g)
    if cuda:  # --compile's path once (inductor; on the CPU it is traced by the tests instead)
        ctx.case("train grouped fp32 --compile", lambda: _smoke_train(small, "grouped", "fp32",
                                                                     compile=True),
                 kind="compile", guess=60)
    ctx.case("cli reproduce + checkpoint + resume", lambda: _smoke_cli(ctx),
             guess=45 if cuda or not ctx.quick else 25)
    for name in ("lsuv", "datadep", "gabor", "filterbank", "lion_dg"):
        ctx.case(f"method {name}", lambda n=name: _smoke_method(small, n), kind="method",
                 guess=3 * g)


# --------------------------------------------------------------------------- tests
def _pytest_counts(text: str) -> dict[str, int]:
    """Outcome counts from ``pytest -v`` lines (``… PASSED``, ``… FAILED`` …), cut or not."""
    counts: dict[str, int] = {}
    for outcome in re.findall(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    return counts


def _run_gpu_tests(ctx: Ctx) -> dict:
    env = {**os.environ, "TORCH_DEVICE": str(ctx.dev), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider"]
    timeout = max(ctx.left() - 2, 5)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else \
            (e.stdout or "")
        failed = re.findall(r"(\S+::\S+) FAILED", text)
        raise TimeoutError(f"pytest -m gpu cut at its share ({timeout:.0f} s): "
                           f"{_pytest_counts(text)} so far; failed: {failed}") from None
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    out = {"exit_code": r.returncode, "summary": tail, "counts": _pytest_counts(r.stdout),
           "failures": sorted(set(re.findall(r"FAILED (\S+)", r.stdout))),
           "errors": sorted(set(re.findall(r"ERROR (\S+)", r.stdout)))}
    if r.returncode not in (0, 5):  # 5: no test collected
        raise AssertionError(f"{tail}; failed: {out['failures'] + out['errors']}"[:1500])
    return out


def part_tests(ctx: Ctx) -> None:
    ctx.case("pytest -m gpu", lambda: _run_gpu_tests(ctx), guess=15)


# --------------------------------------------------------------------------- prewarm
def _prewarm_case(ctx: Ctx, c: int, hw: int, P: int, loop: str, allow_s: float) -> dict:
    dev = ctx.dev
    x = torch.rand(256, c, hw, hw, generator=torch.Generator().manual_seed(0)).to(dev)
    opts = {"loop": loop}

    def call(i, conv):
        return prewarm_(conv, x, n_patches=P, scale="auto", kmeans_options=opts, generator=i)

    def conv():
        return nn.Conv2d(c, 32, 3, padding=1).to(dev)

    t0 = time.perf_counter()
    t = time.perf_counter()
    call(0, conv())  # the first call in this process for this shape and loop
    _sync(dev)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    call(1, conv())
    _sync(dev)
    one = time.perf_counter() - t
    # The counts cost about four calls (plus the profiler's start); the rest of the allowance
    # buys warm rounds.
    cap = 5 if ctx.quick else 50
    rounds = int(max(0.0, allow_s - (time.perf_counter() - t0) - 6 * one) / max(one, 1e-4))
    rounds = max(3, min(cap, rounds))
    convs = [conv() for _ in range(rounds)]
    _sync(dev)
    times, steps = [], []
    for i in range(rounds):
        t = time.perf_counter()
        r = call(2 + i, convs[i])
        _sync(dev)
        times.append(time.perf_counter() - t)
        steps.append(r.kmeans_steps)
    row = {"cold_first_call_ms": cold * 1e3, "warm_median_ms": statistics.median(times) * 1e3,
           "warm_min_ms": min(times) * 1e3, "rounds": rounds,
           "kmeans_steps_mean": statistics.mean(steps), "n_patches": P, "loop": loop}
    row.update(count_syncs_and_launches(lambda: call(0, conv()), dev))
    return row


def part_prewarm(ctx: Ctx) -> None:
    cases = [("colour", 3, 32, 28, "device"), ("grey", 1, 28, 58, "device")]
    if not ctx.quick:  # the loop `auto` picks on CUDA, against the other one
        cases += [("colour loop=host", 3, 32, 28, "host"), ("grey loop=host", 1, 28, 58, "host")]
    guess = 3.0 if ctx.dev.type == "cuda" else 1.0
    for i, (name, c, hw, P, loop) in enumerate(cases):
        allow = ctx.left() / (len(cases) - i)
        ctx.case(name, lambda c=c, hw=hw, P=P, loop=loop, allow=allow:
                 _prewarm_case(ctx, c, hw, P, loop, allow), kind="prewarm", guess=guess)


# --------------------------------------------------------------------------- kmeans
def _blobs(n: int, d: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    labels = torch.randint(0, k, (n,), generator=g)
    X = centres[labels] + torch.randn(n, d, generator=g)
    true_inertia = float((X.double() - centres[labels].double()).square().sum())
    return X, true_inertia


def _inertia(X: torch.Tensor, centres: torch.Tensor) -> float:
    from prewarm_gpu.kmeans_ops import _labels_inertia

    return float(_labels_inertia(X, centres.to(X.device, X.dtype))[1])


def _kmeans_case(ctx: Ctx, n: int, d: int, k: int, allow_s: float) -> dict:
    from sklearn.cluster import MiniBatchKMeans as SkMiniBatchKMeans

    t0 = time.perf_counter()
    X, true = _blobs(n, d, k)
    Xd = X.to(ctx.dev)
    t = time.perf_counter()
    _ = MiniBatchKMeans(k, random_state=0).fit(Xd).inertia_  # warm-up; its time sizes rounds
    one = time.perf_counter() - t
    t = time.perf_counter()
    sk = SkMiniBatchKMeans(k, n_init=3, random_state=0).fit(X.numpy())
    sk_one = time.perf_counter() - t
    spend = allow_s - (time.perf_counter() - t0)
    cap = 2 if ctx.quick else 3 if n >= 1_000_000 else 10
    rounds = max(1, min(cap, int(0.7 * spend / max(one, 1e-4))))
    sk_cap = 0 if ctx.quick or n >= 100_000 else 2  # beyond the first fit
    sk_rounds = max(0, min(sk_cap, int(0.3 * spend / max(sk_one, 1e-4))))
    ours, steps, inert = [], [], []
    for s in range(1, rounds + 1):
        t = time.perf_counter()
        km = MiniBatchKMeans(k, random_state=s).fit(Xd)
        inert.append(km.inertia_)  # the result read (the call's last sync)
        ours.append(time.perf_counter() - t)
        steps.append(km.n_steps_)
    sk_t, sk_in = [sk_one], [_inertia(X, torch.from_numpy(sk.cluster_centers_))]
    for s in range(1, sk_rounds + 1):
        t = time.perf_counter()
        sk = SkMiniBatchKMeans(k, n_init=3, random_state=s).fit(X.numpy())
        sk_t.append(time.perf_counter() - t)
        sk_in.append(_inertia(X, torch.from_numpy(sk.cluster_centers_)))
    return {"ours_median_ms": statistics.median(ours) * 1e3, "ours_steps_mean": np.mean(steps),
            "ours_inertia_ratio": float(np.mean(inert)) / true,
            "sklearn_median_ms": statistics.median(sk_t) * 1e3,
            "sklearn_inertia_ratio": float(np.mean(sk_in)) / true,
            "rounds": rounds, "sklearn_rounds": len(sk_t)}


def part_kmeans(ctx: Ctx) -> None:
    sizes = QUICK_KMEANS_SIZES if ctx.quick else KMEANS_SIZES
    cuda = ctx.dev.type == "cuda"
    for i, (n, d, k) in enumerate(sizes):
        ours, sk = KMEANS_GUESS_S[n]
        scale = 1.0 if cuda else 4.0  # our fit on a CPU is slower; the estimate must not be low
        guess = 2 * ours * scale + sk * (d / 27) + 1e-7 * n * d  # two fits + sklearn + the data
        allow = max(ctx.left() / (len(sizes) - i), guess)
        ctx.case(f"{n}x{d}_k{k}", lambda n=n, d=d, k=k, allow=allow:
                 _kmeans_case(ctx, n, d, k, allow), guess=guess)


# --------------------------------------------------------------------------- training
def _train_cost(row: dict, seconds: float) -> dict[str, float]:
    """The cost model of :func:`training_sizes` refitted from one ``bench_training`` row."""
    runs, c, s = row["runs"], row["compare_steps"], row["sweep_steps"]
    compare = row["paper_style_s"] + row["single_run_s"] + row["batched_s"] + sum(
        runs * c / v for v in row["backend_run_steps_s"].values())
    sweep = row["sweep_batched_s"] if s != c else 0.0
    per_sweep = sweep / s if s != c else row["batched_s"] / c
    return {"per_compare": compare / c, "per_sweep": per_sweep,
            "overhead": max(0.0, seconds - compare - sweep)}


def part_training(ctx: Ctx) -> None:
    import bench_training

    dev = ctx.dev.type  # bench_training compares device strings (issue 31 item 7)
    ctx.data.setdefault("datasets", {})
    if ctx.quick:
        plan = [("mnist", ["--size", "tiny", "--seeds", "1", "--steps", "2"])]
        guess = 15.0 if dev == "cpu" else 20.0
    else:
        plan = [(name, None) for name in TRAIN_DATASETS]
        guess = 0.0
    # gpu-facts (H100, 16 runs): paper-style ~100, single ~340, batched ~900 run-steps/s, and
    # the three backends again: ~0.3 s per compare step, ~0.02 s per sweep step, ~10 s of data
    # and model set-up per dataset.
    cost = {"overhead": 10.0, "per_compare": 0.3, "per_sweep": 0.02}
    for i, (name, argv) in enumerate(plan):
        # The first dataset (cifar10, Table 3's size) also times every backend × graphs ×
        # channels_last variant (bench_training --variants): ~3× the compare steps' cost.
        variants = i == 0 and not ctx.quick
        if argv is None:
            allow = ctx.left() / (len(plan) - i)
            step_cost = dict(cost, per_compare=cost["per_compare"] * (3.0 if variants else 1.0))
            sizes = training_sizes(allow / SAFETY, step_cost)
            if sizes is None:
                need = SAFETY * (cost["overhead"] + 10 * cost["per_compare"])
                ctx.data["datasets"][name] = {
                    "status": "skipped",
                    "reason": f"{allow:.0f} s left for it; 10 compare steps need ~{need:.0f} s"}
                ctx.skipped.append(name)
                ctx.suite.save()
                continue
            c, s = sizes
            argv = ["--size", "full", "--steps", str(s), "--compare-steps", str(c),
                    *(["--variants"] if variants else [])]
            guess = SAFETY * (step_cost["overhead"] + step_cost["per_compare"] * c +
                              (step_cost["per_sweep"] * s if s != c else 0))
        full = ["--device", dev, "--datasets", name, *argv]
        t = time.perf_counter()
        got = ctx.case(name, lambda full=full: bench_training.main(full), guess=guess,
                       into=ctx.data["datasets"], kind=f"train {name}")
        if got and name in got.get("datasets", {}):
            row = got["datasets"][name]
            ctx.data["datasets"][name] = {"status": "ok", "seconds": ctx.data["datasets"][name]
                                          ["seconds"], "argv": full, **row}
            if not ctx.quick and not variants:  # a variants row's cost is not the others'
                try:
                    cost = _train_cost(row, time.perf_counter() - t)
                except (KeyError, TypeError, ZeroDivisionError) as e:  # keep the last model
                    ctx.data["cost_model_error"] = error_record(e, 3)
            ctx.data["measured"] = _measured(ctx.data["datasets"], dev)
            ctx.suite.save()


def _measured(rows: dict[str, dict], dev: str) -> dict[str, dict[str, float]]:
    """Run-steps/s per backend, averaged over the datasets measured: the table
    ``prewarm_gpu.train.load_measured`` reads (``result["training"]["measured"]``)."""
    speeds = [r["backend_run_steps_s"] for r in rows.values() if "backend_run_steps_s" in r]
    if not speeds:
        return {}
    return {dev: {b: sum(s[b] for s in speeds) / len(speeds) for b in speeds[0]}}


# --------------------------------------------------------------------------- summary
def _part_status(result: dict, name: str) -> str:
    p = result["parts"].get(name, {})
    status = p.get("status", "not run")
    if status == "failed":
        err = p.get("error")
        if err:
            return f"failed: {err['type']}"
        cases = result.get(name, {})
        rows = cases.get("datasets", cases)
        first = rows.get(p["failed_cases"][0], {}).get("error", {}).get("type", "?")
        return f"failed: {len(p['failed_cases'])} case(s), first {p['failed_cases'][0]} " \
               f"({first})"
    if status == "skipped":
        return f"skipped: {p.get('reason', '')}"
    if status == "ok" and p.get("skipped_cases"):
        return f"ok, {len(p['skipped_cases'])} case(s) skipped (time)"
    return status


def _figures(result: dict, name: str) -> str:
    """One short cell of the part's headline figures ("" when its rows are not the usual)."""
    try:
        return _headline(result.get(name) or {}, name)
    except (KeyError, TypeError, ValueError, AttributeError):  # the summary must always print
        return ""


def _headline(rows: dict, name: str) -> str:
    ok = {k: v for k, v in rows.items() if isinstance(v, dict) and v.get("status") == "ok"}
    if name == "smoke":
        return f"{len(ok)}/{len(rows)} cases passed"
    if name == "tests":
        r = ok.get("pytest -m gpu")
        return r["summary"][:60] if r else ""
    if name == "prewarm":
        return "; ".join(f"{k} {v['warm_median_ms']:.1f} ms, {v['host_syncs']} syncs, "
                         f"{v.get('kernel_launches', v['aten_ops'])} "
                         f"{'kernels' if 'kernel_launches' in v else 'ops'}"
                         for k, v in ok.items() if "loop=host" not in k)
    if name == "kmeans":
        return "; ".join(f"{k} {v['ours_median_ms']:.0f} ms ({v['ours_inertia_ratio']:.2f}) vs "
                         f"{v['sklearn_median_ms']:.0f}" for k, v in ok.items())
    if name == "training":
        m = rows.get("measured") or {}
        return "; ".join(f"{b} {v:.3g}" for speeds in m.values() for b, v in speeds.items()) + \
            (" run-steps/s" if m else "")
    return ""


def summary(result: dict) -> str:
    """The short table printed last: what survives when the output is cut."""
    commit = (result.get("commit") or "unknown")[:14]
    lines = [f"GPU suite · {result['device_name']} · torch {result['torch']}"
             f"{' (CUDA ' + result['cuda'] + ')' if result.get('cuda') else ''} · commit {commit}"
             f" · {result['date']} · budget {result['budget_s']:.0f} s, took "
             f"{result.get('elapsed_s', 0):.0f} s · {result['status']}",
             "", "| part | status | s | figures |", "| --- | --- | ---: | --- |"]
    for name in result["parts"]:
        p = result["parts"][name]
        lines.append(f"| {name} | {_part_status(result, name)[:90]} | "
                     f"{p.get('seconds', 0):.1f} | {_figures(result, name)[:160]} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
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


PART_FNS: dict[str, Callable[[Ctx], None]] = {
    "smoke": part_smoke, "tests": part_tests, "prewarm": part_prewarm, "kmeans": part_kmeans,
    "training": part_training}


def _on_sigterm(signum, frame):
    raise SuiteInterrupted(f"signal {signum}")


def main(argv=None, started: float | None = None) -> int:
    """Run the suite; returns the exit code (0: no part failed; 1: one did; 128+n: signal n)."""
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
    started = time.monotonic() if started is None else started
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # initialise CUDA outside every timing
    result = {"suite": "benchmarks/gpu_suite.py", "status": "running",
              "device_name": _device_name(dev), "device": str(dev),
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "cuda": torch.version.cuda if dev.type == "cuda" else None,
              "commit": git_commit(), "python": platform.python_version(),
              "argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
              "budget_s": args.budget, "parts": {}}
    slug = re.sub(r"[^a-z0-9]+", "-", result["device_name"].lower()).strip("-")[:40]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-suite-{slug}-{result['date']}{'-quick' if args.quick else ''}.json"
    suite = Suite(path, result, started, args.budget)
    plan = PLAN[(dev.type, args.quick)]
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    code = 0
    try:
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
            run_part(suite, name, PART_FNS[name], dev, args.quick, part_share(left, later))
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
