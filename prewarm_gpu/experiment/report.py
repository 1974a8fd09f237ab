"""What a reproduce sweep reports: Table 3's paired statistics from the run records, and Table 1's
data statistics.

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026), Tables 1 and 3. Everything here is computed from ``results.jsonl`` (or the data), so a
table can be rewritten at any time (``--report-only``).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import rules
from ..data import DATASETS, load_dataset
from ..models import fc_dim
from ..stats import MIN_PAIRS_FOR_MARKS, PairedStats, paired_stats, table3_markdown
from ..training.protocol import steps_to_target
from .datarule import refused_as_bad_data, rule_statistics
from .jsonable import jsonable
from .plan import (
    BASELINE,
    DEFAULT_ARCH,
    RunSpec,
    SweepConfig,
    arch_of,
    arms_of,
    methods_of,
    needs_rule,
    rule_of,
    rule_text,
)
from .records import SUMMARY, TABLE, latest_by_key, write_atomic


def is_ok(rec: dict[str, Any] | None) -> bool:
    """A finished run with an accuracy."""
    return rec is not None and rec.get("status") == "ok" and rec.get("accuracy") is not None


def _steps_to_target(rec: dict[str, Any], target: float) -> int | None:
    """:func:`prewarm_gpu.train.steps_to_target` of a record's stored loss curve."""
    c = rec.get("curves") or {}
    return steps_to_target(c.get("loss_steps", []), c.get("loss", []), target)


def summarise(config: SweepConfig, specs: Sequence[RunSpec],
              records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Paired statistics per (dataset, method) from the records of this sweep's runs."""
    latest = latest_by_key(records)
    by_key = {s.key: latest.get(s.key) for s in specs}
    out: dict[str, Any] = {"datasets": {}}
    for ds in config.datasets:
        mine = [s for s in specs if s.dataset == ds]
        entry: dict[str, Any] = {"title": DATASETS[ds].title,
                                 "train": asdict(config.train_config(ds)),
                                 "protocol": _protocol(config, ds), "methods": {},
                                 "failed": [], "missing": []}
        for s in mine:
            rec = by_key[s.key]
            if rec is None:
                entry["missing"].append(s.label)
            elif rec["status"] != "ok":
                entry["failed"].append({"run": s.label, "error": rec.get("error"),
                                        "failed_step": rec.get("failed_step")})
        for m in methods_of(config):
            entry["methods"][m] = _method_summary(config, mine, by_key, m)
        out["datasets"][ds] = entry
    return out


# The paper's Table 3 Δacc (Pre-Warm − Kaiming, 8 seeds): the effect each row's power is for.
PAPER_DELTA_ACC = {"mnist": 0.0005, "fashion-mnist": 0.0016, "cifar10": 0.0023, "svhn": 0.0048,
                   "cifar100": 0.0068}

BASELINE_NAMES = {
    "torch-default": "PyTorch's default init, kaiming_uniform_(a=√5): std 1/√(3·fan_in)",
    "he-normal": "He et al. 2015 normal: std √(2/fan_in), biases 0",
    "he-uniform": "He et al. 2015 uniform: std √(2/fan_in), biases 0",
}


def _protocol(config: SweepConfig, ds: str) -> dict[str, Any]:
    """What a reader needs to know a table's numbers came from: steps, seeds, precision, device,
    baseline (the table's caption)."""
    tc = config.train_config(ds)
    p = {"steps": tc.steps, "batch_size": tc.batch_size, "lr": [tc.lr_start, tc.lr_end],
         "seeds": list(config.seeds), "precision": config.precision,
         "device": str(config.device), "baseline": config.baseline}
    if tc.t_max != tc.steps:
        p["schedule_steps"] = tc.t_max
    ruled = [rule for arm in arms_of(config) if needs_rule(arm)
             for _, rule in [rule_of(config, ds, arm)]]
    if ruled:
        p["rule"] = ruled[0]
    return p


def _schedule_text(p: dict[str, Any]) -> str:
    """Which reading of "the result at N steps": the end of an N-step cosine schedule, or step N
    of a longer one (``--schedule-steps``)."""
    t = p.get("schedule_steps")
    return (f"accuracy at step {p['steps']} of a {p['steps']}-step cosine schedule" if t is None
            else f"accuracy at step {p['steps']} of the {t}-step cosine schedule (stopped early)")


def protocol_text(p: dict[str, Any]) -> str:
    """The protocol part of a table's caption (Table 3's and the grid's): steps, batch, learning
    rates, seeds, precision, device and the baseline, from a summary's ``p``."""
    seeds = " ".join(map(str, p["seeds"]))
    return (f"{p['steps']} steps, batch {p['batch_size']}, lr {p['lr'][0]:g}→{p['lr'][1]:g}, "
            f"{len(p['seeds'])} seeds ({seeds}), {p['precision']}, device {p['device']}; "
            f"\"Kaiming\" is the baseline {p['baseline']} ({BASELINE_NAMES[p['baseline']]})")


def _caption(title: str, p: dict[str, Any]) -> str:
    return (f"{title}: {protocol_text(p)}; {_schedule_text(p)}"
            + (f"; Pre-Warm's {rule_text(p['rule'])}" if p.get("rule") else "") + ".")


def _method_summary(config, specs, by_key, method) -> dict[str, Any]:
    arch = arch_of(method)
    base = {s.seed: by_key[s.key] for s in specs if s.init == BASELINE and s.arch == arch}
    meth = {s.seed: by_key[s.key] for s in specs if s.init == method}
    seeds = [sd for sd in config.seeds
             if is_ok(base.get(sd)) and is_ok(meth.get(sd))]
    k_acc = [base[sd]["accuracy"] for sd in seeds]
    m_acc = [meth[sd]["accuracy"] for sd in seeds]
    t = config.target_loss
    res: dict[str, Any] = {
        "arch": arch,
        "seeds": seeds,
        "kaiming_acc": k_acc,
        "method_acc": m_acc,
        "target_loss": t,
        "kaiming_steps_to_target": [_steps_to_target(base[sd], t) for sd in seeds],
        "method_steps_to_target": [_steps_to_target(meth[sd], t) for sd in seeds],
        "stats": paired_stats(m_acc, k_acc).as_dict() if seeds else None,
    }
    return res


def _stats_of(d: dict[str, Any]) -> PairedStats:
    return PairedStats(**{k: (math.nan if v is None else v) for k, v in d.items()})


def _mean_steps(steps: Sequence[int | None]) -> str:
    hit = [s for s in steps if s is not None]
    if not hit:
        return f"never (0/{len(steps)})"
    return f"{np.mean(hit):.0f} ({len(hit)}/{len(steps)})"


def render_tables(summary: dict[str, Any]) -> str:
    """Table 3 (Markdown) and the convergence table, with footnotes."""
    rows, conv, notes, captions = [], [], [], []
    target = None
    deltas: list[float | None] = []
    for ds, entry in summary["datasets"].items():
        if "protocol" in entry:
            captions.append(_caption(entry["title"], entry["protocol"]))
        for m, ms in entry["methods"].items():
            arch = "" if ms["arch"] == DEFAULT_ARCH else f" ({ms['arch']})"
            if ms["stats"] is not None:
                st = _stats_of(ms["stats"])
                if "diff_std" not in ms["stats"] and st.n >= 2:  # a summary.json from before
                    d = np.subtract(ms["method_acc"], ms["kaiming_acc"])
                    st = replace(st, diff_std=float(d.std(ddof=1)))
                rows.append((entry["title"], m + arch, st))
                deltas.append(PAPER_DELTA_ACC.get(ds))
            target = ms["target_loss"]
            k_steps = _mean_steps(ms["kaiming_steps_to_target"])
            m_steps = _mean_steps(ms["method_steps_to_target"])
            conv.append(f"| {entry['title']} | {m}{arch} | {k_steps} | {m_steps} |")
        for f in entry["failed"]:
            step = f" at step {f['failed_step']}" if f.get("failed_step") else ""
            notes.append(f"- failed: {f['run']}{step}: {f['error']}")
        if entry["missing"]:
            notes.append(f"- not run yet ({len(entry['missing'])}): {', '.join(entry['missing'])}")
    parts = [table3_markdown(rows, deltas) if rows else "(no finished pairs yet)", "", *captions,
             "",
             "Accuracy: final test accuracy, mean ± sample std (ddof=1) over seeds; Δacc: mean "
             "paired difference (method − Kaiming); Δerr% = −Δacc / (1 − mean Kaiming acc); p: "
             "one-sided paired t-test (method > Kaiming), * p<0.1, ** p<0.05, *** p<0.01, marked "
             f"only from n ≥ {MIN_PAIRS_FOR_MARKS} pairs; n/a: undefined (fewer than 2 pairs, or "
             "every paired difference equal); wins: seeds where the method is strictly ahead; "
             "Wilcoxon p: one-sided signed-rank test of the same pairs; 95 % CI Δacc: paired "
             "bootstrap (BCa, 9999 resamples, fixed seed; n ≥ 3); p (Holm): the t-test's p "
             "adjusted across this table's datasets, per method; power at paper Δ: the "
             "probability that this test (one-sided α 0.05, n pairs) detects the paper's Table 3 "
             "Δacc for the dataset if it were the true effect, from the observed SD of the paired "
             "differences (noncentral t); MDΔ 80 %: the smallest true Δacc detected with 80 % "
             "power (not t·SD/√n, which has power ≈ 0.5)."]
    if conv:
        parts += ["", f"| Dataset | Method | steps to loss < {target:g}, Kaiming | method |",
                  "| --- | --- | ---: | ---: |", *conv, "",
                  "Steps to target: first curve point (window-mean training loss) below the "
                  "target; mean over the seeds that reached it (reached/pairs)."]
    if notes:
        parts += ["", *notes]
    return "\n".join(parts)


@dataclass
class Outcome:
    """What a sweep's report wrote: the text (tables) and the summary (with its failed runs)."""

    table: str
    summary: dict[str, Any]

    @property
    def failed(self) -> int:
        return sum(len(e["failed"]) for e in self.summary["datasets"].values())


def write_summary(config: SweepConfig, specs: Sequence[RunSpec], records, env) -> Outcome:
    """Write ``summary.json`` and ``table.md`` (atomically); return them."""
    summary = summarise(config, specs, records)
    table = render_tables(summary)
    summary.update(
        table_markdown=table,
        sweep={"datasets": config.datasets, "seeds": config.seeds, "inits": config.inits,
               "init_options": jsonable(config.init_options), "device": config.device,
               "runs": len(specs)},
        env=env,
        written_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    text = json.dumps(jsonable(summary), indent=2, ensure_ascii=False)
    write_atomic(config.out / SUMMARY, text + "\n")
    write_atomic(config.out / TABLE, table + "\n")
    return Outcome(table, summary)


# --- Table 1 -------------------------------------------------------------------------------------

def stats_row(name: str, *, data_dir: Path | None, download: bool, device: str,
              n_filters: int = 32, log=None) -> dict[str, Any]:
    """Table 1's derived quantities for one dataset, over its whole training split."""
    data = load_dataset(name, data_dir=data_dir, download=download, device=device)
    if data.source is not None and log is not None:
        log(f"{data.spec.name}: read from {data.source}")
    s = data.spec
    gray = s.in_channels == 1
    with refused_as_bad_data(data):
        st = rule_statistics(data)
        tau, d, norm = st["otsu_tau"], st["d"], st["mean_patch_norm"]
        n_patches = (rules.n_patches_grayscale(d, n_filters) if gray
                     else rules.n_patches_color(norm, n_filters))
    return {"dataset": s.title, "in_channels": s.in_channels,
            "image": f"{s.image_size[0]}×{s.image_size[1]}", "fc_dim": fc_dim(s.image_size),
            "lr": f"{s.lr_start:g}→{s.lr_end:g}", "otsu_tau": tau, "d": d, "mean_patch_norm": norm,
            "n_patches": n_patches, "rule": "eq. 5 (Otsu)" if gray else "eq. 6 (patch norm)",
            "scale": rules.default_scale(s.in_channels, 3),
            "paper": (f"{s.paper_n_patches} / {s.paper_scale:.2f}"
                      if s.paper_n_patches is not None else "—")}


def stats_table(rows: list[dict[str, Any]]) -> str:
    """Rows of :func:`stats_row` as a Markdown table (Table 1's columns plus the statistics)."""
    out = ["| Dataset | C_in | Image | FC dim | η_start→η_end | Otsu τ* | d | mean ‖p̃‖₂ | "
           "n_patches | rule | σ | paper n_patches / σ |",
           "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['in_channels']} | {r['image']} | {r['fc_dim']} | "
                   f"{r['lr']} | {r['otsu_tau']:.4f} | {r['d']:.4f} | {r['mean_patch_norm']:.4f} | "
                   f"{r['n_patches']} | {r['rule']} | {r['scale']:.2f} | {r['paper']} |")
    return "\n".join(out)
