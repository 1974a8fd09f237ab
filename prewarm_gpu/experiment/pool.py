"""``prewarm-gpu report --pool DIR DIR …``: replications of one protocol combined seed by seed.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), Table 3's paired test. Two folders that ran the same protocol (say one on a CPU, one on
an H100) are two measurements of the same eight seeds. They are *not* sixteen independent pairs:
the replications share their seeds, so a seed's initial weights and data order are the same in
both, and that seed's effect shows up once per replication. Pooling all pairs naively would count
one seed's effect twice and understate the standard error. Instead each seed's difference is
averaged over the replications that have it, and the one-sided paired t-test runs on those
per-seed means (:func:`prewarm_gpu.stats.pooled_by_seed`): n is the number of seeds.

Records are matched by (dataset, init, seed), not by key, so folders written by older versions
(other keys) pool too. Differences that change what is measured (steps, schedule, batch size,
learning rates, baseline, precision) are refused; device, commit, protocol version, layout,
initialiser options and data fingerprints may differ and are listed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DATASETS
from ..stats import (
    PairedStats,
    format_mean_std,
    format_p,
    paired_stats,
    pooled_by_seed,
    power_columns,
)
from .plan import BASELINE
from .records import RESULTS, read_results
from .report import PAPER_DELTA_ACC, is_ok

# What must agree for two folders to measure the same thing; the rest is listed, not refused.
MUST_MATCH = ("steps", "schedule_steps", "batch_size", "lr_start", "lr_end", "aux_weight",
              "baseline", "precision")


class PoolError(ValueError):
    """The folders cannot be pooled: a missing results file or protocols that differ."""


@dataclass
class Replication:
    """One folder's ok records, the last written per (dataset, init, seed)."""

    path: Path
    runs: dict[tuple[str, str, int], dict[str, Any]]
    superseded: int = 0  # older ok records of the same (dataset, init, seed), not used
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def protocol_of(rec: dict[str, Any]) -> dict[str, Any]:
    """The :data:`MUST_MATCH` fields of a record (records older than a field get its default)."""
    c = rec["config"]
    t = c.get("train", {})
    return {"steps": t.get("steps"), "schedule_steps": t.get("schedule_steps", t.get("steps")),
            "batch_size": t.get("batch_size"), "lr_start": t.get("lr_start"),
            "lr_end": t.get("lr_end"), "aux_weight": t.get("aux_weight"),
            "baseline": c.get("baseline", "torch-default"), "precision": c.get("precision", "fp32")}


def incidental_of(rec: dict[str, Any]) -> dict[str, Any]:
    """What may differ between replications, to be shown."""
    c, env = rec["config"], rec.get("env") or {}
    return {"device": env.get("device_name") or env.get("device") or c.get("device_type"),
            "commit": env.get("git_commit"), "protocol": c.get("protocol"),
            "options": c.get("options"), "data_fingerprint": rec.get("data_fingerprint"),
            "n_patches": (rec.get("init_report") or {}).get("n_patches")}


def load_replication(folder: str | Path) -> Replication:
    """The ok records of ``folder/results.jsonl``; several ok records of one (dataset, init,
    seed) with different configs: the last written is used (a re-run supersedes), and the folder
    notes how many were passed over."""
    path = Path(folder)
    f = path / RESULTS
    if not f.is_file():
        raise PoolError(f"--pool: {path} has no {RESULTS}")
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    superseded = 0
    for rec in read_results(f):
        if not is_ok(rec):
            continue
        k = (rec["dataset"], rec["init"], int(rec["seed"]))
        if k in runs and runs[k]["key"] != rec["key"]:
            superseded += 1
        runs[k] = rec
    if not runs:
        raise PoolError(f"--pool: {f} holds no finished run")
    rep = Replication(path, runs, superseded)
    if superseded:
        rep.notes.append(f"{rep.name}: {superseded} older record(s) of the same (dataset, init, "
                         "seed) superseded by later ones (the last written is used)")
    return rep


def _check_protocols(reps: Sequence[Replication], dataset: str, init: str) -> None:
    seen: dict[str, tuple[str, Any]] = {}
    for rep in reps:
        for (ds, ini, seed), rec in rep.runs.items():
            if ds != dataset or ini not in (init, BASELINE):
                continue
            for k, v in protocol_of(rec).items():
                if k not in seen:
                    seen[k] = (f"{rep.name} ({ini} seed {seed})", v)
                elif seen[k][1] != v:
                    raise PoolError(
                        f"--pool: {dataset} {init}: the protocols differ in {k}: {seen[k][1]!r} "
                        f"in {seen[k][0]} but {v!r} in {rep.name} ({ini} seed {seed}); only "
                        f"replications of one protocol pool (these must match: "
                        f"{', '.join(MUST_MATCH)})")


def _pairs(rep: Replication, dataset: str, init: str) -> dict[int, tuple[float, float]]:
    out = {}
    for (ds, ini, seed), rec in rep.runs.items():
        base = rep.runs.get((ds, BASELINE, seed))
        if ds == dataset and ini == init and base is not None:
            out[seed] = (float(rec["accuracy"]), float(base["accuracy"]))
    return dict(sorted(out.items(), key=lambda kv: kv[0]))


def _differences(reps: Sequence[Replication], dataset: str, init: str) -> list[str]:
    """The incidental fields that differ between the folders, one line each."""
    lines = []
    per = {}
    for rep in reps:
        vals: dict[str, set] = {}
        for (ds, ini, _), rec in rep.runs.items():
            if ds == dataset and ini in (init, BASELINE):
                for k, v in incidental_of(rec).items():
                    if k == "n_patches" and ini == BASELINE:
                        continue
                    if k == "options" and ini == BASELINE:
                        continue
                    vals.setdefault(k, set()).add(repr(v) if isinstance(v, dict) else v)
        per[rep.name] = vals
    keys = dict.fromkeys(k for v in per.values() for k in v)
    for k in keys:
        shown = {name: sorted(map(str, v.get(k, set()))) for name, v in per.items()}
        if len({tuple(s) for s in shown.values()}) > 1:
            lines.append(f"- {k} differs: " + "; ".join(f"{n}: {', '.join(s) or '—'}"
                                                         for n, s in shown.items()))
    return lines


def pool(folders: Sequence[str | Path]) -> str:
    """Each replication's row and the pooled row per (dataset, method), as Markdown, with the
    folders' differences. Raises :class:`PoolError` for fewer than two folders, a folder without
    results, or protocols that differ in :data:`MUST_MATCH`."""
    if len(folders) < 2:
        raise PoolError(f"--pool needs at least two folders, got {len(folders)}")
    reps = [load_replication(f) for f in folders]
    names = [r.name for r in reps]
    if len(set(names)) != len(names):
        names = [str(r.path) for r in reps]
    combos = list(dict.fromkeys((ds, ini) for r in reps for (ds, ini, _) in r.runs
                                if ini != BASELINE))
    out = []
    for ds, init in combos:
        have = [r for r in reps if _pairs(r, ds, init)]
        if len(have) < 2:
            continue
        _check_protocols(have, ds, init)
        title = DATASETS[ds].title if ds in DATASETS else ds
        paper = PAPER_DELTA_ACC.get(ds)
        out += [f"### {title}: {init} against Kaiming", "",
                "| Replication | n | Kaiming | Method acc | Δacc | p | wins | 95 % CI Δacc | "
                f"SD of Δ | power at paper Δ{'' if paper is None else f' {paper:+.4f}'} | "
                "MDΔ 80 % |",
                "| --- | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        pairs = [_pairs(r, ds, init) for r in have]
        for r, p in zip(have, pairs, strict=True):
            name = names[reps.index(r)]
            out.append(_row(name, paired_stats([m for m, _ in p.values()],
                                               [k for _, k in p.values()]), paper))
        seeds, m, k = pooled_by_seed(pairs)
        out.append(_row(f"**pooled by seed** ({len(have)} replications)", paired_stats(m, k),
                        paper))
        counts = [sum(1 for p in pairs if sd in p) for sd in seeds]
        how = (f"all {len(have)}" if min(counts) == len(have)
               else "per seed: " + ", ".join(f"{sd}: {c}" for sd, c in zip(seeds, counts,
                                                                            strict=True)))
        out += ["", f"Pooled: {len(seeds)} seeds ({' '.join(map(str, seeds))}); each seed's "
                f"method and Kaiming accuracies averaged over the replications that have it "
                f"({how}), then the one-sided paired t-test on those per-seed means (n = seeds, "
                "not pairs: the replications share seeds, so their pairs are not independent)."]
        diffs = _differences(have, ds, init)
        if diffs:
            out += ["", "Differences between the replications (allowed):", *diffs]
        out.append("")
    if not out:
        raise PoolError("--pool: no (dataset, method) has finished pairs in two or more of "
                        f"{', '.join(map(str, folders))}")
    notes = [n for r in reps for n in r.notes]
    out += [*(f"- {n}" for n in notes), "" if notes else "",
            "Power at paper Δ: probability that the one-sided paired t-test (α 0.05) on n seeds "
            "detects the paper's Table 3 Δacc, from the observed SD of the differences "
            "(noncentral t); MDΔ 80 %: the smallest true Δacc detected with 80 % power."]
    return "\n".join(out).replace("\n\n\n", "\n\n")


def _row(name: str, s: PairedStats, paper: float | None) -> str:
    pw, mdd = power_columns(s, paper)
    ci = "n/a" if math.isnan(s.ci_low) else f"[{s.ci_low:+.4f}, {s.ci_high:+.4f}]"
    sd = "n/a" if math.isnan(s.diff_std) else f"{s.diff_std:.4f}"
    return (f"| {name} | {s.n} | {format_mean_std(s.base_mean, s.base_std)} | "
            f"{format_mean_std(s.method_mean, s.method_std)} | {s.delta_acc:+.4f} | "
            f"{format_p(s.p, s.n)} | {s.wins}/{s.n} | {ci} | {sd} | {pw} | {mdd} |")
