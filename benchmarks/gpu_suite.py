"""Every GPU figure of the project in one command: tests, Pre-Warm, k-means, training throughput.

Run on a GPU machine from the project root (each part fits one call of at most 10 minutes; run
the parts separately with ``--parts`` when calls are limited)::

    PYTHONPATH=$PWD python3 benchmarks/gpu_suite.py --out "$OUT"
    PYTHONPATH=$PWD python3 benchmarks/gpu_suite.py --parts prewarm kmeans --out "$OUT"

It writes ``gpu-suite-<device>-<date>.json`` (commit it under ``benchmarks/results/``) and prints a
summary table. ``--device cpu --quick`` runs every part at small sizes in under a minute; CI runs it
so that the suite cannot rot.

Parts:
- ``tests``: ``pytest -m gpu`` (CUDA only).
- ``prewarm``: ``prewarm_`` on the colour (256×3×32×32, P = 28) and grey (256×1×28×28, P = 58)
  batches: the first call in the process (cold, after CUDA is initialised) and the median of warm
  calls, synchronised, one seed per round; per call the host syncs (CUDA's sync debug mode; on the
  CPU the dispatch counter) and kernel launches (``torch.profiler``; on the CPU ATen ops).
- ``kmeans``: ``MiniBatchKMeans`` against scikit-learn's on blobs of 7168×27 (k 16), 100k×27 (16),
  1M×27 (64), 1M×147 (64), with each one's inertia as a ratio to the true centres' inertia.
- ``training``: ``bench_training.py`` (full sizes on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prewarm_gpu import MiniBatchKMeans, prewarm_  # noqa: E402
from prewarm_gpu.counters import count_dispatch  # noqa: E402

PARTS = ("tests", "prewarm", "kmeans", "training")
KMEANS_SIZES = [(7168, 27, 16), (100_000, 27, 16), (1_000_000, 27, 64), (1_000_000, 147, 64)]
QUICK_KMEANS_SIZES = [(7168, 27, 16), (20_000, 27, 16)]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def count_syncs_and_launches(fn, dev: torch.device) -> dict:
    """Host syncs and kernel launches (CUDA) or ATen ops (CPU) of one call of ``fn``."""
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
        out["kernel_launches"] = sum(
            1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # the profiler is optional: say why the count is missing
        out["kernel_launches"] = None
        out["kernel_launches_error"] = repr(e)
    return out


def part_tests(dev: torch.device, quick: bool) -> dict:
    if dev.type != "cuda":
        return {"skipped": "the gpu tests need CUDA"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                        "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    return {"exit_code": r.returncode, "summary": tail, "seconds": time.perf_counter() - t,
            "failures": re.findall(r"FAILED (\S+)", r.stdout)}


def part_prewarm(dev: torch.device, quick: bool) -> dict:
    rounds = 5 if quick else 50
    cases = {"colour": (3, 32, 28), "grey": (1, 28, 58)}
    out = {}
    for name, (c, hw, P) in cases.items():
        x = torch.rand(256, c, hw, hw, generator=torch.Generator().manual_seed(0)).to(dev)
        convs = [nn.Conv2d(c, 32, 3, padding=1).to(dev) for _ in range(rounds + 1)]
        _sync(dev)

        def call(i, convs=convs, x=x, P=P):
            return prewarm_(convs[i], x, n_patches=P, scale="auto", generator=i)

        t = time.perf_counter()
        call(0)  # the first call in this process for this shape
        _sync(dev)
        cold = time.perf_counter() - t
        times, steps = [], []
        for i in range(1, rounds + 1):
            t = time.perf_counter()
            r = call(i)
            _sync(dev)
            times.append(time.perf_counter() - t)
            steps.append(r.kmeans_steps)
        row = {"cold_first_call_ms": cold * 1e3, "warm_median_ms": statistics.median(times) * 1e3,
               "warm_min_ms": min(times) * 1e3, "rounds": rounds,
               "kmeans_steps_mean": statistics.mean(steps), "n_patches": P}
        row.update(count_syncs_and_launches(lambda: call(0), dev))
        out[name] = row
    return out


def _blobs(n: int, d: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    labels = torch.randint(0, k, (n,), generator=g)
    X = centres[labels] + torch.randn(n, d, generator=g)
    true_inertia = float((X.double() - centres[labels].double()).square().sum())
    return X, true_inertia


def _inertia(X: torch.Tensor, centres: torch.Tensor) -> float:
    from prewarm_gpu.kmeans import _labels_inertia

    return float(_labels_inertia(X, centres.to(X.device, X.dtype))[1])


def part_kmeans(dev: torch.device, quick: bool) -> dict:
    from sklearn.cluster import MiniBatchKMeans as SkMiniBatchKMeans

    out = {}
    for n, d, k in QUICK_KMEANS_SIZES if quick else KMEANS_SIZES:
        X, true = _blobs(n, d, k)
        Xd = X.to(dev)
        rounds = 3 if quick or n >= 1_000_000 else 10
        ours, steps, inert = [], [], []
        MiniBatchKMeans(k, random_state=0).fit(Xd)  # warm-up
        _sync(dev)
        for s in range(rounds):
            t = time.perf_counter()
            km = MiniBatchKMeans(k, random_state=s).fit(Xd)
            inert.append(km.inertia_)  # the result read (the call's last sync)
            ours.append(time.perf_counter() - t)
            steps.append(km.n_steps_)
        sk_rounds = 1 if n >= 100_000 else 3
        sk_t, sk_in = [], []
        for s in range(sk_rounds):
            t = time.perf_counter()
            sk = SkMiniBatchKMeans(k, n_init=3, random_state=s).fit(X.numpy())
            sk_t.append(time.perf_counter() - t)
            sk_in.append(_inertia(X, torch.from_numpy(sk.cluster_centers_)))
        out[f"{n}x{d}_k{k}"] = {
            "ours_median_ms": statistics.median(ours) * 1e3, "ours_steps_mean": np.mean(steps),
            "ours_inertia_ratio": float(np.mean(inert)) / true,
            "sklearn_median_ms": statistics.median(sk_t) * 1e3,
            "sklearn_inertia_ratio": float(np.mean(sk_in)) / true,
            "rounds": rounds, "sklearn_rounds": sk_rounds,
        }
    return out


def part_training(dev: torch.device, quick: bool) -> dict:
    import bench_training

    if quick:
        argv = ["--device", dev.type, "--size", "tiny", "--seeds", "1", "--steps", "2",
                "--datasets", "mnist"]
    else:
        argv = ["--device", dev.type, "--size", "full", "--steps", "1000", "--compare-steps",
                "100"]
    return bench_training.main(argv)


def summary(result: dict) -> str:
    lines = [f"GPU suite on {result['device_name']} ({result['date']})", "",
             "| what | value |", "| --- | ---: |"]
    for case, row in result.get("prewarm", {}).items():
        lines.append(f"| prewarm_ {case}: warm median / cold first call | "
                     f"{row['warm_median_ms']:.2f} ms / {row['cold_first_call_ms']:.1f} ms |")
        lines.append(f"| prewarm_ {case}: host syncs / launches (ATen ops) | {row['host_syncs']} / "
                     f"{row.get('kernel_launches')} ({row['aten_ops']}) |")
    for size, row in result.get("kmeans", {}).items():
        lines.append(f"| k-means {size}: ours / sklearn (inertia ratio) | "
                     f"{row['ours_median_ms']:.1f} ms ({row['ours_inertia_ratio']:.3f}) / "
                     f"{row['sklearn_median_ms']:.1f} ms ({row['sklearn_inertia_ratio']:.3f}) |")
    tr = result.get("training")
    if tr:
        lines.append(f"| training sweep (batched, {tr['args']['steps']} steps) | "
                     f"{tr['sweep_batched_total_s']:.1f} s |")
    tests = result.get("tests")
    if tests and "summary" in tests:
        lines.append(f"| gpu tests | {tests['summary']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds (CI)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                   help="folder for the JSON")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # initialise CUDA outside every timing
    result = {"device_name": _device_name(dev), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "quick": args.quick, "parts": {}}
    for part in args.parts:
        t = time.perf_counter()
        result[part] = globals()[f"part_{part}"](dev, args.quick)
        result["parts"][part] = time.perf_counter() - t
        print(f"[gpu_suite] {part}: {result['parts'][part]:.1f} s", file=sys.stderr)
    slug = re.sub(r"[^a-z0-9]+", "-", result["device_name"].lower()).strip("-")[:40]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-suite-{slug}-{result['date']}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(summary(result))
    print(f"[gpu_suite] wrote {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
