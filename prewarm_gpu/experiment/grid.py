"""``prewarm-gpu grid``: the paper's hyperparameter grid (§4.3) on the sweep engine.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), §4.3: on Fashion-MNIST, patch_size ∈ {3, 5} × n_clusters ∈ {8, 16, 32, 64} × n_patches ∈
{10, 15, 20, 25, 30, 50, 100} × scale ∈ {0.05, 0.1, 0.2, 0.3}, 8 seeds per cell, each cell judged
by a paired t-test of the training loss at 500 steps against Kaiming. Its claims: significance
only at n_clusters = 16 and patch_size = 3; along n_patches, at 25 and not at 20 or 30; scale
insensitive in [0.1, 0.25]; the Otsu rule (eq. 5) predicting 22.

Every cell is one Pre-Warm arm (:class:`~.plan.Arm`) and one Kaiming run per seed is shared by all
cells, so a grid is a :func:`~.plan.plan_runs` plan run by :func:`~.engine.execute` — the same
pairing, stacked training, results file, resume and progress bar as ``reproduce``.

The metric. Every run stores its training loss at every step (``loss_points = steps``), so any
definition can be recomputed from ``results.jsonl``. The grid's "training loss at N steps" is

.. math::
    L_N = \\frac{1}{W}\\sum_{t=N-W+1}^{N} \\ell_t, \\qquad W = 50,

the mean minibatch loss of the last ``W`` steps (one minibatch is too noisy to rank cells by).
``--metric accuracy`` uses the final test accuracy instead.

Outputs: ``grid.md`` (one row per cell, the rule's n_patches marked), ``grid.json``, and with
``--plot`` ``grid_<dataset>.png``: heat maps of Δ and −log10 p over n_patches × scale for each
(patch_size, n_clusters).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from typing import Any

import numpy as np
import torch

from ..checks import is_real
from ..stats import holm, min_detectable_delta, paired_stats
from ..training.protocol import TrainConfig
from .engine import Outputs, execute, prepare
from .jsonable import jsonable
from .plan import BASELINE, Arm, RunSpec, SweepConfig, batchable, plan_runs, rule_of, rule_text
from .plots import import_pyplot, plot_grid
from .records import latest_by_key, write_atomic
from .report import Outcome, is_ok, protocol_text

PAPER_GRID: dict[str, tuple] = {  # §4.3
    "patch_size": (3, 5),
    "n_clusters": (8, 16, 32, 64),
    "n_patches": (10, 15, 20, 25, 30, 50, 100),
    "scale": (0.05, 0.1, 0.2, 0.3),
}
AXES = tuple(PAPER_GRID)
LOSS_WINDOW = 50  # L_N: the mean training loss of the last 50 steps
METRICS = ("loss", "accuracy")
GRID_MD, GRID_JSON = "grid.md", "grid.json"
METHOD = "prewarm"


@dataclass
class GridConfig(SweepConfig):
    """A grid: :class:`~.plan.SweepConfig` (one dataset) plus the axes and the metric."""

    datasets: list[str] = field(default_factory=lambda: ["fashion-mnist"])
    out: Any = None  # default: runs/grid-<dataset>
    steps: int | None = 500  # §4.3: the loss at 500 steps
    eval_points: int = 1  # the final test accuracy (for --metric accuracy)
    patch_size: list[int] = field(default_factory=lambda: list(PAPER_GRID["patch_size"]))
    n_clusters: list[int] = field(default_factory=lambda: list(PAPER_GRID["n_clusters"]))
    n_patches: list[int] = field(default_factory=lambda: list(PAPER_GRID["n_patches"]))
    scale: list[float] = field(default_factory=lambda: list(PAPER_GRID["scale"]))
    metric: str = "loss"  # loss (L_N, lower is better) | accuracy (final, higher is better)
    rule_n_patches: int | None = None  # eq. 5/6 on the dataset (marked in grid.md); None: compute
    batch: bool | None = None  # stacked training; None: on a GPU only (see auto_group_size)

    def __post_init__(self):
        if self.out is None:
            self.out = f"runs/grid-{self.datasets[0]}" if self.datasets else "runs/grid"
        self.inits = [BASELINE, METHOD]
        if self.batch is None:
            self.batch = torch.device(self.device).type != "cpu"

    def train_config(self, dataset: str) -> TrainConfig:
        """The sweep's protocol with the loss recorded at every step (so L_N, and any other
        definition, can be recomputed from the results file)."""
        tc = super().train_config(dataset)
        return replace(tc, loss_points=tc.steps)


def check_grid(config: GridConfig) -> None:
    """Refuse a grid that cannot run, before any training (one ``ValueError`` per problem)."""
    if len(config.datasets) != 1:
        raise ValueError(f"grid runs on one dataset at a time, got {config.datasets}")
    if config.metric not in METRICS:
        raise ValueError(f"--metric must be one of {METRICS}, got {config.metric!r}")
    for axis in AXES:
        values = getattr(config, axis)
        if not values:
            raise ValueError(f"--{axis.replace('_', '-')} needs at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"--{axis.replace('_', '-')} has repeated values: {values}")
        bad = [v for v in values if not is_real(v) or v <= 0]
        if bad:
            raise ValueError(f"--{axis.replace('_', '-')} values must be positive numbers, got "
                             f"{bad}")
    steps = config.train_config(config.datasets[0]).steps
    if config.metric == "loss" and steps < LOSS_WINDOW:
        raise ValueError(f"--metric loss averages the last {LOSS_WINDOW} steps; --steps must be "
                         f">= {LOSS_WINDOW}, got {steps}")


def cells(config: GridConfig) -> list[dict[str, Any]]:
    """Every cell, in axis order (patch_size slowest, scale fastest)."""
    axes = [getattr(config, a) for a in AXES]
    return [dict(zip(AXES, values, strict=True)) for values in itertools.product(*axes)]


def grid_arms(config: GridConfig) -> list[Arm]:
    """One Pre-Warm arm per cell."""
    return [Arm.of(METHOD, cell) for cell in cells(config)]


def plan_grid(config: GridConfig) -> list[RunSpec]:
    """The grid's runs: per seed, one Kaiming run shared by every cell, then each cell's run."""
    check_grid(config)
    return plan_runs(config, grid_arms(config))


def auto_group_size(config: GridConfig, specs: Sequence[RunSpec]) -> int:
    """Runs trained together when stacked training is on and ``--group-size`` is not given.

    On a GPU, every run of the grid at once (a plan that does not fit fails with the device's
    out-of-memory error: narrow it with --group-size). On the CPU the grid trains one run at a
    time by default, because stacking measured slower there (``benchmarks/bench_grid.py``; see
    the README); asked for anyway (``batch=True``), one seed's runs (its Kaiming run and every
    cell) train together, so each group ends with complete pairs recorded."""
    if torch.device(config.device).type == "cpu":
        return max(1, sum(1 for s in specs if s.seed == specs[0].seed))
    return len(specs)


def loss_at_end(rec: dict[str, Any], window: int = LOSS_WINDOW) -> float | None:
    """L_N of a record: the mean of its last ``window`` per-step training losses (None when the
    record has fewer)."""
    c = rec.get("curves") or {}
    steps, loss = c.get("loss_steps") or [], c.get("loss") or []
    n = rec["config"]["train"]["steps"]
    tail = [v for s, v in zip(steps, loss, strict=False) if s > n - window]
    if len(tail) != window or any(v is None for v in tail):
        return None
    return float(np.mean(tail))


def metric_of(rec: dict[str, Any] | None, metric: str) -> float | None:
    """The grid's metric of a record (None when it did not finish or lacks the data)."""
    if not is_ok(rec):
        return None
    return loss_at_end(rec) if metric == "loss" else float(rec["accuracy"])


def cell_stats(method: Sequence[float], base: Sequence[float], metric: str) -> dict[str, Any]:
    """Pre-Warm against Kaiming in one cell, in the direction that means "Pre-Warm is better":
    for the loss, lower; for accuracy, higher. Δ is Pre-Warm − Kaiming of the metric; p is the
    one-sided paired t-test (``scipy.stats.ttest_rel``), ``wilcoxon_p`` the one-sided signed-rank
    test, ``ci`` the paired bootstrap 95 % interval of Δ, ``wins`` the seeds where Pre-Warm is
    strictly better (:func:`prewarm_gpu.stats.paired_stats` on the sign-adjusted values)."""
    sign = -1.0 if metric == "loss" else 1.0
    m, k = np.asarray(method, dtype=np.float64), np.asarray(base, dtype=np.float64)
    s = paired_stats(sign * m, sign * k)
    ci = sorted([sign * s.ci_low, sign * s.ci_high])
    return {"n": s.n, "kaiming_mean": float(k.mean()),
            "kaiming_std": float(k.std(ddof=1)) if s.n > 1 else math.nan,
            "prewarm_mean": float(m.mean()),
            "prewarm_std": float(m.std(ddof=1)) if s.n > 1 else math.nan,
            "delta": sign * s.delta_acc, "t": s.t, "p": s.p, "wilcoxon_p": s.wilcoxon_p,
            "ci": ci, "wins": s.wins, "ties": s.ties, "diff_std": s.diff_std,
            "mdd80": _mdd80(s)}


def _mdd80(s) -> float:
    """The smallest true |Δ| this cell's test detects with 80 % power (one-sided α 0.05, from
    the observed SD of its paired differences; noncentral t). The paper gives no Δ of the loss
    to compute a power for, so the grid states this instead."""
    return (min_detectable_delta(s.diff_std, s.n)
            if s.n >= 2 and math.isfinite(s.diff_std) and s.diff_std > 0 else math.nan)


def summarise_grid(config: GridConfig, specs: Sequence[RunSpec],
                   records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per cell, the paired statistics of the metric over the seeds where both runs finished,
    and Holm-adjusted p-values across the cells."""
    latest = latest_by_key(records)
    base = {s.seed: latest.get(s.key) for s in specs if s.init == BASELINE}
    rows, failed, missing = [], [], []
    for s in specs:
        rec = latest.get(s.key)
        if rec is None:
            missing.append(s.label)
        elif rec["status"] != "ok":
            failed.append({"run": s.label, "error": rec.get("error")})
    for cell in cells(config):
        arm = Arm.of(METHOD, cell)
        mine = {s.seed: latest.get(s.key) for s in specs if s.arm == arm}
        seeds, m, k = [], [], []
        for seed in config.seeds:
            mv, kv = metric_of(mine.get(seed), config.metric), \
                metric_of(base.get(seed), config.metric)
            if mv is not None and kv is not None:
                seeds.append(seed)
                m.append(mv)
                k.append(kv)
        row = {**cell, "seeds": seeds, "prewarm": m, "kaiming": k,
               "rule": cell["n_patches"] == config.rule_n_patches,
               **(cell_stats(m, k, config.metric) if seeds else {"n": 0, "p": math.nan})}
        rows.append(row)
    for row, p in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = p
    ds = config.datasets[0]
    tc = config.train_config(ds)
    return {"dataset": ds, "metric": config.metric, "loss_window": LOSS_WINDOW,
            "steps": tc.steps, "batch_size": tc.batch_size, "lr": [tc.lr_start, tc.lr_end],
            "seeds": list(config.seeds), "precision": config.precision,
            "device": str(config.device), "baseline": config.baseline,
            "rule_n_patches": config.rule_n_patches,
            "rule": config.dataset_rules.get(ds), "schedule_steps": tc.t_max,
            "axes": {a: list(getattr(config, a)) for a in AXES},
            "cells": rows, "failed": failed, "missing": missing}


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def render_grid(summary: dict[str, Any]) -> str:
    """``grid.md``: one row per cell, the rule's n_patches marked, then the caption."""
    what = (f"training loss L_{summary['steps']} (mean of the last {summary['loss_window']} "
            "steps; lower is better)" if summary["metric"] == "loss"
            else "final test accuracy (higher is better)")
    head = ["| patch | k | n_patches | scale | n | Kaiming | Pre-Warm | Δ | 95 % CI Δ | p | "
            "p (Holm) | Wilcoxon p | wins | MDΔ 80 % |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: "
            "| ---: | ---: |"]
    rows = []
    for r in summary["cells"]:
        mark = " ◀ rule" if r["rule"] else ""
        if not r["n"]:
            rows.append(f"| {r['patch_size']} | {r['n_clusters']} | {r['n_patches']}{mark} | "
                        f"{r['scale']:g} | 0 | | | | | | | | | |")
            continue
        ci = r["ci"]
        rows.append(
            f"| {r['patch_size']} | {r['n_clusters']} | {r['n_patches']}{mark} | {r['scale']:g} | "
            f"{r['n']} | {_f(r['kaiming_mean'])} ± {_f(r['kaiming_std'])} | "
            f"{_f(r['prewarm_mean'])} ± {_f(r['prewarm_std'])} | {r['delta']:+.4f} | "
            f"[{_f(ci[0])}, {_f(ci[1])}] | {_p(r['p'])} | {_p(r['p_holm'])} | "
            f"{_p(r['wilcoxon_p'])} | {r['wins']}/{r['n']} | {_f(r.get('mdd80'))} |")
    rule = summary["rule_n_patches"]
    how = (rule_text({**summary["rule"], "n_patches": rule}) if summary.get("rule")
           else f"the n_patches eq. 5/6 gives on this dataset ({rule})")
    rule_note = ("" if rule is None else f" ◀ rule: {how}"
                 + ("" if rule in summary["axes"]["n_patches"] else ", not on this axis") + ".")
    T = summary.get("schedule_steps") or summary["steps"]
    reading = (f"the {what.split(' (')[0]} at step {summary['steps']} of a {T}-step cosine "
               "schedule (the schedule ends there)" if T == summary["steps"] else
               f"the {what.split(' (')[0]} at step {summary['steps']} of the {T}-step cosine "
               "schedule (stopped early; --schedule-steps)")
    parts = [*head, *rows, "",
             f"{summary['dataset']}: {what}; {protocol_text(summary)}, one run per seed shared "
             f"by every cell. Reading: {reading}.",
             "",
             "Kaiming, Pre-Warm: mean ± sample std over the seeds where both runs finished (n); "
             "Δ: mean paired difference of the metric, Pre-Warm − Kaiming; p: one-sided paired "
             "t-test in the direction \"Pre-Warm is better\"; p (Holm): adjusted across the "
             f"{len(summary['cells'])} cells of this table; Wilcoxon p: one-sided signed-rank "
             "test; 95 % CI: paired bootstrap (BCa, 9999 resamples, fixed seed); wins: seeds "
             "where Pre-Warm is strictly better; MDΔ 80 %: the smallest true |Δ| this cell's "
             "test detects with 80 % power (one-sided α 0.05, noncentral t, from the observed SD "
             "of the paired differences; t·SD/√n is the Δ detected only half of the time); "
             "n/a: undefined." + rule_note]
    if summary["failed"]:
        parts += ["", *(f"- failed: {f['run']}: {f['error']}" for f in summary["failed"])]
    if summary["missing"]:
        parts += ["", f"- not run yet: {len(summary['missing'])} runs"]
    return "\n".join(parts)


def write_grid(config: GridConfig, specs: Sequence[RunSpec], records, env) -> Outcome:
    """Write ``grid.json`` and ``grid.md`` (atomically); return them."""
    import json

    summary = summarise_grid(config, specs, records)
    table = render_grid(summary)
    summary.update(table_markdown=table, env=env,
                   written_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_atomic(config.out / GRID_JSON,
                 json.dumps(jsonable(summary), indent=2, ensure_ascii=False) + "\n")
    write_atomic(config.out / GRID_MD, table + "\n")
    return Outcome(table, {"datasets": {summary["dataset"]: summary}})


def _plot_end(config: GridConfig, specs, records) -> None:
    plot_grid(summarise_grid(config, specs, records), config.out)


def grid_outputs(config: GridConfig, specs: list[RunSpec]) -> Outputs:
    """``grid.json`` and ``grid.md``; with ``--plot``, the heat maps."""
    return Outputs(partial(write_grid, config, specs), None,
                   partial(_plot_end, config, specs) if config.plot else None)


def prepare_grid(config: GridConfig) -> tuple[GridConfig, list[RunSpec]]:
    """Every check that needs no training (:func:`.engine.prepare`), then the group size and the
    rule's n_patches ``grid.md`` marks (:func:`grid_rule`, unless given)."""
    if config.rule_source != "dataset":
        raise ValueError(f"--rule-source {config.rule_source!r}: every grid cell gives n_patches "
                         "(the --n-patches axis), so no run uses a rule; the row grid.md marks is "
                         "the dataset rule's value. Use --rule-source dataset")
    config, specs = prepare(config, plan_grid, plot_check=import_pyplot)
    if config.group_size is None and config.batch and batchable(specs[0].arch):
        config = replace(config, group_size=auto_group_size(config, specs))
    if config.rule_n_patches is None:
        rule = grid_rule(config)
        config = replace(config, rule_n_patches=rule["n_patches"],
                         dataset_rules={**config.dataset_rules, config.datasets[0]: rule})
    return config, specs


def run_grid(config: GridConfig, *, log: Callable[[str], None] | None = None) -> Outcome:
    """Run every missing run of the grid, writing results as they finish; the grid's table.
    Raises what :func:`.reproduce.reproduce` raises."""
    config, specs = prepare_grid(config)
    return execute(config, specs, grid_outputs(config, specs), log=log)


def grid_rule(config: GridConfig) -> dict[str, Any]:
    """The paper's rule on the grid's dataset (:func:`.datarule.dataset_rule`: eq. 5 from the Otsu
    density of the whole training split, eq. 6 for colour) with its ``n_patches`` for the
    default Pre-Warm arm's F (SimpleCNN: 32), the value ``grid.md`` marks."""
    _, rule = rule_of(config, config.datasets[0], Arm(METHOD))
    return rule
