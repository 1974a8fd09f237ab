"""Figures of a sweep (``--plot``): conv1 filters at initialisation, learning curves, grid heat
maps. matplotlib is a development extra, imported only here and only when asked for."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import DATASETS, ImageData
from ..layers import find_conv
from .arms import build_arm
from .plan import DEFAULT_ARCH, RunSpec, SweepConfig
from .records import latest_by_key
from .report import is_ok


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'prewarm-gpu[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _filter_grid(w: torch.Tensor, cols: int = 8) -> np.ndarray:
    """conv1 weights (F, C, k, k) → one image of F filters in rows of ``cols``, 1-pixel white gaps,
    each filter min-max scaled to [0, 1]; (H, W, 3) for C = 3, else (H, W) of channel 0."""
    w = w.detach().float().cpu()
    F_, C, kh, kw = w.shape
    flat = w.reshape(F_, -1)
    lo, hi = flat.min(1).values.view(F_, 1, 1, 1), flat.max(1).values.view(F_, 1, 1, 1)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    shown = w if C == 3 else w[:, :1]
    rows = -(-F_ // cols)
    canvas = torch.ones(rows * (kh + 1) - 1, cols * (kw + 1) - 1, shown.shape[1])
    for f in range(F_):
        r, c = divmod(f, cols)
        canvas[r * (kh + 1) : r * (kh + 1) + kh, c * (kw + 1) : c * (kw + 1) + kw] = \
            shown[f].permute(1, 2, 0)
    img = canvas.numpy()
    return img if C == 3 else img[..., 0]


def plot_filters(config: SweepConfig, specs: Sequence[RunSpec], data: ImageData) -> Path | None:
    """``filters_<dataset>.png``: conv1 at initialisation, Kaiming next to each method (first
    seed). Pre-Warm's conditioned filters are the first ``n_clusters`` (top rows)."""
    plt = import_pyplot()
    seed = config.seeds[0]
    mine = [s for s in specs if s.dataset == data.spec.name and s.seed == seed]
    panels = []
    for s in mine:
        try:
            model, _ = build_arm(s, data)
            _, conv = find_conv(model, data.train_x.shape[1])
        except Exception as e:  # noqa: BLE001 — a plot must not end the sweep
            warnings.warn(f"filter plot: {s.label}: {e}", stacklevel=2)
            continue
        panels.append((s.init if s.arch == DEFAULT_ARCH else f"{s.init} ({s.arch})",
                       _filter_grid(conv.weight)))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.4), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels, strict=True):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    fig.suptitle(f"{data.spec.title}: conv1 at initialisation (seed {seed}; each filter min-max "
                 "scaled)", fontsize=10)
    path = config.out / f"filters_{data.spec.name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(config: SweepConfig, specs: Sequence[RunSpec],
                records: Sequence[dict[str, Any]]) -> list[Path]:
    """``curves_<dataset>.png``: mean test accuracy (± std band over seeds) and training loss."""
    plt = import_pyplot()
    latest = latest_by_key(records)
    paths = []
    for ds in config.datasets:
        groups: dict[str, list[dict[str, Any]]] = {}
        for s in specs:
            rec = latest.get(s.key)
            if s.dataset == ds and is_ok(rec):
                name = s.init if s.arch == DEFAULT_ARCH else f"{s.init} ({s.arch})"
                groups.setdefault(name, []).append(rec)
        if not groups:
            continue
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, recs in groups.items():
            for ax, xs, ys in ((ax_acc, "acc_steps", "test_acc"), (ax_loss, "loss_steps", "loss")):
                x = recs[0]["curves"][xs]
                same = [r for r in recs if r["curves"][xs] == x]
                if len(same) < len(recs):
                    warnings.warn(f"curves_{ds}.png: {len(recs) - len(same)} {name} run(s) have "
                                  f"other {xs} than the first; drawn without them", stacklevel=2)
                y = np.array([r["curves"][ys] for r in same], dtype=float)
                mean, std = y.mean(0), y.std(0)
                (line,) = ax.plot(x, mean, label=f"{name} (n={len(y)})")
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax_acc.set(xlabel="step", ylabel="test accuracy", title="test accuracy (mean ± std)")
        accs = [a for g in groups.values() for r in g for a in r["curves"]["test_acc"][1:]]
        if accs:  # zoom past step 0's chance level
            ax_acc.set_ylim(max(0.0, min(accs) - 0.01), min(1.0, max(accs)) + 0.005)
        ax_loss.set(xlabel="step", ylabel="training loss (window mean)", yscale="log",
                    title="training loss (mean ± std)")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(DATASETS[ds].title)
        path = config.out / f"curves_{ds}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_grid(summary: dict[str, Any], out: Path) -> Path | None:
    """``grid_<dataset>.png``: for each (patch_size, n_clusters), heat maps of Δ (Pre-Warm −
    Kaiming of the metric) and −log10 p over n_patches × scale; the rule's n_patches outlined."""
    plt = import_pyplot()
    cells = [c for c in summary["cells"] if c.get("n")]
    if not cells:
        return None
    xs, ys = summary["axes"]["n_patches"], summary["axes"]["scale"]
    pairs = list(dict.fromkeys((c["patch_size"], c["n_clusters"]) for c in cells))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 2.2 + 2.4 * len(pairs)), squeeze=False)
    lower = summary["metric"] == "loss"
    for row, (ps, k) in zip(axes, pairs, strict=True):
        delta = np.full((len(ys), len(xs)), np.nan)
        logp = np.full_like(delta, np.nan)
        for c in cells:
            if (c["patch_size"], c["n_clusters"]) == (ps, k):
                i, j = ys.index(c["scale"]), xs.index(c["n_patches"])
                delta[i, j] = c["delta"]
                if c["p"] is not None and np.isfinite(c["p"]):
                    logp[i, j] = -np.log10(c["p"])
        lim = np.nanmax(np.abs(delta)) if np.isfinite(delta).any() else 1.0
        panels = ((delta, "Δ " + summary["metric"] + (" (< 0: Pre-Warm better)" if lower else
                   " (> 0: Pre-Warm better)"), "RdBu_r" if lower else "RdBu", -lim, lim),
                  (logp, "−log10 p (one-sided t-test)", "viridis", 0, max(2.0, np.nanmax(logp)
                   if np.isfinite(logp).any() else 2.0)))
        for ax, (z, title, cmap, lo, hi) in zip(row, panels, strict=True):
            im = ax.imshow(z, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", origin="lower")
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            ax.set(xlabel="n_patches", ylabel="scale", title=f"patch {ps}, k={k}: {title}")
            for (i, j), v in np.ndenumerate(z):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.3f}" if z is delta else f"{v:.2f}", ha="center",
                            va="center", fontsize=7)
            if summary.get("rule_n_patches") in xs:
                j = xs.index(summary["rule_n_patches"])
                ax.axvline(j - 0.5, color="k", lw=1.5)
                ax.axvline(j + 0.5, color="k", lw=1.5)
            fig.colorbar(im, ax=ax)
    fig.suptitle(f"{summary['dataset']}: Pre-Warm − Kaiming, {summary['steps']} steps, "
                 f"{len(summary['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    path = out / f"grid_{summary['dataset']}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
