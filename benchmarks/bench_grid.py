"""The grid's speed (issue 14 item 5): run-steps per second of ``prewarm-gpu grid`` as it runs
(one seed's runs stacked on the CPU; all runs on a GPU) against the same runs one at a time
(``--no-batch``: the single-run trainer, channels_last), side by side in one process.

Each repetition runs both modes on the same cells, seeds and data (loaded once), alternating
which goes first; the whole :func:`~prewarm_gpu.experiment.grid.run_grid` call is timed (arms
built, k-means, training, evaluation, records written), and its run-steps (runs × steps) divided
by the time. The ratio is the median over repetitions of grid ÷ one-at-a-time.

With ``--modes … ray`` the same runs also go through ``--executor ray`` (issue 15): a local Ray
started once here (``ray.init(num_cpus=…)``, one worker per CPU with one thread each, or one per
GPU), timed the same way (each sweep's actors are started and load the data inside the timing,
as for a user's sweep); its runs per minute per worker are reported.

Usage::

    python benchmarks/bench_grid.py --dataset fashion-mnist --device cpu --threads 1 \\
        --steps 100 --reps 3 --out benchmarks/results/grid-cpu-2core.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from prewarm_gpu.data import load_dataset
from prewarm_gpu.experiment import engine, units
from prewarm_gpu.experiment.grid import GridConfig, prepare_grid, run_grid

MODES = {  # name: the GridConfig fields that make it
    "grid": {"batch": True},
    "one_at_a_time": {"batch": False},
    "ray": {"executor": "ray"},  # the grid's default grouping, on Ray workers
}


def _config(args, out: Path, mode: str) -> GridConfig:
    return GridConfig(datasets=[args.dataset], seeds=args.seeds, out=out, device=args.device,
                      steps=args.steps, patch_size=[3], n_clusters=[16], n_patches=args.n_patches,
                      scale=[0.2], rule_n_patches=0, progress=False, checkpoint_every="0",
                      metric=args.metric, **MODES[mode])


def _timed(args, out: Path, mode: str) -> dict:
    config, specs = prepare_grid(_config(args, out, mode))
    groups = engine._groups(specs, config.batch, config.group_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_grid(config, log=lambda s: None)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    run_steps = len(specs) * args.steps
    return {"seconds": seconds, "runs": len(specs), "groups": len(groups),
            "run_steps_per_s": run_steps / seconds, "runs_per_minute": 60 * len(specs) / seconds}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    p.add_argument("--n-patches", type=int, nargs="+", default=[10, 25, 100])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--metric", default="loss", help="accuracy allows --steps < 50")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["grid", "one_at_a_time"],
                   help="what to time side by side (one_at_a_time is always included)")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="with --modes ray: CPUs of the local Ray (default: every core)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def _run_reps(args: argparse.Namespace, modes: list[str]) -> list[dict]:
    """Every repetition: each mode timed on the same data (loaded once), the order rotated."""
    data = load_dataset(args.dataset, device=args.device)
    units.load_dataset = lambda name, **k: data  # load once; the local modes read one copy
    reps = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.reps):
            rep = {}
            for name in modes[i % len(modes):] + modes[:i % len(modes)]:  # rotate the order
                rep[name] = _timed(args, Path(tmp, f"{name}-{i}"), name)
                print(f"rep {i} {name}: {rep[name]['run_steps_per_s']:.2f} run-steps/s",
                      file=sys.stderr, flush=True)
            reps.append(rep)
    return reps


def _blob(args: argparse.Namespace, modes: list[str], reps: list[dict],
          workers: int | None) -> dict:
    """The JSON: the machine, the arguments, every repetition, and the medians and ratios."""
    ratios = {f"{m}_vs_one_at_a_time": statistics.median(
        r[m]["run_steps_per_s"] / r["one_at_a_time"]["run_steps_per_s"] for r in reps)
        for m in modes if m != "one_at_a_time"}
    dev = torch.device(args.device)
    blob = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "device": str(dev),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "torch_threads": torch.get_num_threads()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "reps": reps,
        **{f"{m}_run_steps_per_s": statistics.median(r[m]["run_steps_per_s"] for r in reps)
           for m in modes},
        **{f"{m}_runs_per_minute": statistics.median(r[m]["runs_per_minute"] for r in reps)
           for m in modes},
        **ratios,
    }
    if workers is not None:
        blob["ray_workers"] = workers
        blob["ray_runs_per_minute_per_worker"] = blob["ray_runs_per_minute"] / workers
    return blob


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    modes = list(dict.fromkeys(["one_at_a_time", *args.modes]))
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = None
    if "ray" in modes:
        import ray

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        kind = "GPU" if torch.device(args.device).type == "cuda" else "CPU"
        workers = int(ray.cluster_resources().get(kind, 0))
    blob = _blob(args, modes, _run_reps(args, modes), workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(blob, indent=2) + "\n")
    print(json.dumps({k: v for k, v in blob.items() if k not in ("machine", "args", "reps")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
