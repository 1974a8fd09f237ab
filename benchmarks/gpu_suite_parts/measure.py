"""The measuring parts: ``tests`` (``pytest -m gpu``), ``prewarm`` (``prewarm_``'s cold and warm
calls, host syncs, ATen ops and kernels launched) and ``kmeans`` (against scikit-learn's)."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from gpu_suite_parts.core import ROOT, Ctx, _sync
from prewarm_gpu import MiniBatchKMeans, prewarm_
from prewarm_gpu.counters import count_dispatch

KMEANS_SIZES = [(7168, 27, 16), (100_000, 27, 16), (1_000_000, 27, 64), (1_000_000, 147, 64)]
QUICK_KMEANS_SIZES = [(7168, 27, 16), (20_000, 27, 16)]
# One fit's seconds (ours, scikit-learn's) on the H100 machine, for a first estimate of a size.
KMEANS_GUESS_S = {7168: (0.07, 0.07), 20_000: (0.1, 0.1), 100_000: (0.15, 0.4),
                  1_000_000: (3.0, 18.0)}


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


