"""Training throughput: (a) a paper-style loop, (b) the single-run harness, (c) the batched harness.

(a) is how the paper's code would run: a ``torch.utils.data.DataLoader`` over the standardised
images on the host, one run at a time, a host sync (``loss.item()``) every step. (b) is
:func:`prewarm_gpu.train.train` (data on the device, no per-step sync), one run at a time. (c) is
:func:`prewarm_gpu.train.train_batched`: all runs of a dataset as one stacked model.

Data are synthetic uint8 tensors shaped like the five datasets (``--size full``: the real train and
test sizes) or small ones (``--size tiny``), so no download is needed; only throughput is measured.

Usage::

    python benchmarks/bench_training.py --device cuda --size full --steps 5000 \\
        --out benchmarks/results/training-h200.json          # the complete Table-3 sweep
    python benchmarks/bench_training.py --device cpu --size tiny --steps 20 \\
        --out benchmarks/results/training-cpu.json

``--compare-steps`` sets how many steps (a) and (b) run for the side-by-side ratio (they are too
slow to run the whole sweep); (c) runs the whole sweep of ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from prewarm_gpu.data import DATASETS, ImageData
from prewarm_gpu.models import SimpleCNN
from prewarm_gpu.train import BACKENDS, TrainConfig, cosine_lr, train, train_batched

SEEDS = [42, 7, 13, 99, 2025, 1, 8, 21]
FULL = {"mnist": (60000, 10000), "fashion-mnist": (60000, 10000), "cifar10": (50000, 10000),
        "svhn": (73257, 26032), "cifar100": (50000, 10000)}
TINY = {name: (1024, 256) for name in FULL}


def synthetic(name: str, n_train: int, n_test: int, device: str) -> ImageData:
    """uint8 images and labels with the dataset's shape; deterministic."""
    spec = DATASETS[name]
    g = torch.Generator().manual_seed(0)
    c, (h, w) = spec.in_channels, spec.image_size

    def images(n):
        return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8).to(device)

    def labels(n):
        return torch.randint(0, spec.n_classes, (n,), generator=g).to(device)

    return ImageData(spec, images(n_train), labels(n_train), images(n_test), labels(n_test))


def models_for(data: ImageData, seeds: list[int]) -> list[torch.nn.Module]:
    """Two runs per seed (the two arms), built from the seed as the harness builds them."""
    out = []
    for s in seeds:
        for _ in range(2):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(s)  # the CPU generator alone, as build_arm
                m = SimpleCNN(data.spec.in_channels, data.spec.n_classes, data.spec.image_size)
            out.append(m.to(data.device))
    return out


def measured(rows, device_type: str) -> dict[str, dict[str, float]]:
    """Run-steps/s per backend averaged over the dataset rows that have them: the table
    ``prewarm_gpu.train.load_measured`` reads (this script's ``measured``, the GPU suite's
    ``training.measured``), for ``choose_backend("auto", ...)``."""
    speeds = [r["backend_run_steps_s"] for r in rows if "backend_run_steps_s" in r]
    if not speeds:
        return {}
    return {device_type: {b: sum(s[b] for s in speeds) / len(speeds) for b in speeds[0]}}


def is_cuda(device: str | torch.device) -> bool:
    """Whether ``device`` is a CUDA device ("cuda", "cuda:1", ``torch.device("cuda", 0)``): its
    kernels are queued, so timings must synchronise."""
    return torch.device(device).type == "cuda"


def _sync(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def paper_style(model, data: ImageData, cfg: TrainConfig, seed: int) -> float:
    """(a): DataLoader over host tensors, per-step .item(); returns the last loss."""
    x = data.standardise(data.train_x).cpu()
    y = data.train_y.cpu()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr_start)
    dev = next(model.parameters()).device
    step, loss_value = 0, math.nan
    model.train()
    while step < cfg.steps:
        for xb, yb in loader:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, cfg.steps, cfg.lr_start, cfg.lr_end)
            loss = F.cross_entropy(model(xb.to(dev)), yb.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = loss.item()
            step += 1
            if step == cfg.steps:
                break
    return loss_value


def timed(fn, device: str, *args, **kwargs) -> float:
    """Wall seconds of ``fn(*args, **kwargs)``, synchronised on CUDA before and after."""
    _sync(device)
    t = time.perf_counter()
    fn(*args, **kwargs)
    _sync(device)
    return time.perf_counter() - t


def run_paper_style(data: ImageData, cfg: TrainConfig, seeds: list[int]) -> None:
    for m, s in zip(models_for(data, seeds), _arm_seeds(seeds), strict=True):
        paper_style(m, data, cfg, s)


def run_single(data: ImageData, cfg: TrainConfig, seeds: list[int]) -> None:
    for m, s in zip(models_for(data, seeds), _arm_seeds(seeds), strict=True):
        train(m, data, cfg, seed=s)


def run_batched(data: ImageData, cfg: TrainConfig, seeds: list[int], precision: str,
                backend: str = "auto", **options) -> None:
    """``options``: train_batched's ``graphs``, ``compile``, ``channels_last``."""
    train_batched(models_for(data, seeds), data, cfg, seeds=_arm_seeds(seeds),
                  precision=precision, backend=backend, **options)


def variants(device: str, compile: bool) -> list[dict]:
    """Every (backend × graphs × channels_last × compile) combination worth timing here: graphs
    only on CUDA, compile only when asked (its first call compiles for tens of seconds)."""
    out = []
    for backend in (b for b in BACKENDS if b != "auto"):
        for graphs in (("off", "on") if is_cuda(device) else ("off",)):
            for channels_last in (False, True):
                for comp in ((False, True) if compile else (False,)):
                    out.append({"backend": backend, "graphs": graphs,
                                "channels_last": channels_last, "compile": comp})
    return out


def variant_name(v: dict) -> str:
    return (f"{v['backend']}/graphs={v['graphs']}/channels_last={int(v['channels_last'])}"
            f"/compile={int(v['compile'])}")


def _arm_seeds(seeds: list[int]) -> list[int]:
    return [s for s in seeds for _ in range(2)]


def _parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--datasets", nargs="+", default=list(FULL))
    p.add_argument("--seeds", type=int, default=8, help="seeds per dataset (two arms each)")
    p.add_argument("--steps", type=int, default=20, help="steps of the batched sweep")
    p.add_argument("--compare-steps", type=int, default=None,
                   help="steps for the side-by-side (a)/(b)/(c) comparison (default: --steps)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--variants", action="store_true",
                   help="also time every backend × graphs × channels_last (× compile) variant")
    p.add_argument("--compile", action="store_true", help="with --variants: compile too")
    return p.parse_args(argv)


def _time_variants(data: ImageData, args: argparse.Namespace, warm: TrainConfig,
                   cfg_cmp: TrainConfig, seeds: list[int]) -> dict[str, float]:
    """Run-steps/s of every variant; the first call of each warms it up (and compiles), untimed."""
    dev, out = args.device, {}
    for v in variants(dev, args.compile):
        opts = {k: v[k] for k in ("graphs", "channels_last", "compile")}
        run_batched(data, replace(warm, steps=4), seeds[:1], args.precision, v["backend"], **opts)
        t = timed(run_batched, dev, data, cfg_cmp, seeds, args.precision, v["backend"], **opts)
        out[variant_name(v)] = 2 * len(seeds) * cfg_cmp.steps / t
    return out


def _time_dataset(name: str, args: argparse.Namespace, seeds: list[int],
                  sizes: dict[str, tuple[int, int]]) -> dict:
    """One dataset's row: (a), (b), (c) side by side, each backend, and the whole sweep."""
    dev = args.device
    cmp_steps = args.compare_steps or args.steps
    data = synthetic(name, *sizes[name], dev)
    base = TrainConfig(lr_start=data.spec.lr_start, lr_end=data.spec.lr_end, eval_points=1,
                       loss_points=10)
    cfg_cmp = replace(base, steps=cmp_steps, loss_points=min(10, cmp_steps))
    runs = 2 * len(seeds)
    row = {"runs": runs, "compare_steps": cmp_steps}
    if is_cuda(dev):
        torch.cuda.reset_peak_memory_stats(dev)
    # Side by side on the same runs and steps: (a) and (b) one run at a time, (c) batched.
    # Warm-up (cuDNN autotuning, allocator) excluded: one short run of each first.
    # Model construction is inside the timings, the same for all three.
    warm = replace(cfg_cmp, steps=2, loss_points=1)
    run_paper_style(data, warm, seeds[:1])
    run_single(data, warm, seeds[:1])
    run_batched(data, warm, seeds[:1], args.precision)
    t_a = timed(run_paper_style, dev, data, cfg_cmp, seeds)
    t_b = timed(run_single, dev, data, cfg_cmp, seeds)
    t_c = timed(run_batched, dev, data, cfg_cmp, seeds, args.precision)
    images = runs * cmp_steps * base.batch_size
    # Each backend on the same runs and steps: the figures prewarm_gpu.train.MEASURED holds.
    speeds = {}
    for backend in (b for b in BACKENDS if b != "auto"):
        run_batched(data, warm, seeds[:1], args.precision, backend)
        t = timed(run_batched, dev, data, cfg_cmp, seeds, args.precision, backend)
        speeds[backend] = runs * cmp_steps / t
    row["backend_run_steps_s"] = speeds
    if args.variants:
        row["variant_run_steps_s"] = _time_variants(data, args, warm, cfg_cmp, seeds)
    row.update({"paper_style_s": t_a, "single_run_s": t_b, "batched_s": t_c,
                "paper_style_img_s": images / t_a, "single_run_img_s": images / t_b,
                "batched_img_s": images / t_c, "batched_vs_paper_style": t_a / t_c,
                "batched_vs_single_run": t_b / t_c})
    # The whole sweep for this dataset, batched.
    if args.steps != cmp_steps:
        t_sweep = timed(run_batched, dev, data, replace(base, steps=args.steps), seeds,
                        args.precision)
    else:
        t_sweep = t_c
    row["sweep_steps"] = args.steps
    row["sweep_batched_s"] = t_sweep
    if is_cuda(dev):
        row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    print(f"{name}: (a) {t_a:.2f}s (b) {t_b:.2f}s (c) {t_c:.2f}s for {runs} runs × "
          f"{cmp_steps} steps; batched {t_a / t_c:.1f}× paper-style, "
          f"{t_b / t_c:.2f}× single-run; sweep {t_sweep:.2f}s", file=sys.stderr)
    return row


def main(argv=None) -> dict:
    args = _parse_args(argv)
    dev = args.device
    seeds = SEEDS[: args.seeds]
    sizes = FULL if args.size == "full" else TINY
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(dev) if is_cuda(dev) else None},
        "args": vars(args), "datasets": {},
    }
    sweep_seconds = 0.0
    for name in args.datasets:
        row = _time_dataset(name, args, seeds, sizes)
        sweep_seconds += row["sweep_batched_s"]
        result["datasets"][name] = row
    result["sweep_batched_total_s"] = sweep_seconds
    result["measured"] = measured(result["datasets"].values(), torch.device(dev).type)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
