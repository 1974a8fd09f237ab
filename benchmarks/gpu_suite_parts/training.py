"""The ``training`` part: ``bench_training.py`` per dataset, steps sized from the share, and the
``measured`` table that ``prewarm_gpu.train.load_measured`` reads."""

from __future__ import annotations

import time

from gpu_suite_parts.core import SAFETY, Ctx, error_record

TRAIN_DATASETS = ["cifar10", "mnist", "fashion-mnist", "svhn", "cifar100"]  # gpu-facts' first


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
            ctx.data["measured"] = bench_training.measured(ctx.data["datasets"].values(), dev)
            ctx.suite.save()


