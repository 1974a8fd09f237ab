"""Paired statistics over seeds, as in the paper's Table 3 (§3.5, §5.1).

`Pre-Warm: Input-Conditioned Weight Initialization for Convolutional Neural Networks` - Martinsn
(2026). For each seed the method's and Kaiming's final accuracies form a pair; the test is one-sided
paired t (alternative μ_method > μ_Kaiming), plus the seed-level win count.

.. math::
    Δacc = \\frac{1}{n}\\sum_i (m_i - k_i), \\qquad
    Δerr\\% = -\\frac{Δacc}{1 - \\bar k} \\cdot 100

Means are reported ± the sample standard deviation (ddof = 1). Degenerate cases: with fewer than two
pairs, or when every paired difference is the same (zero variance), t and p are undefined; they are
``nan`` here, ``null`` in JSON and ``n/a`` in tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = ["PairedStats", "paired_stats", "holm", "MIN_PAIRS_FOR_MARKS", "significance",
           "format_mean_std", "format_p", "table3_markdown", "power_at", "min_detectable_delta",
           "pooled_by_seed", "power_columns"]


@dataclass(frozen=True)
class PairedStats:
    """Table 3's columns for one (dataset, method) against Kaiming."""

    n: int  # pairs (seeds where both arms finished)
    base_mean: float  # Kaiming mean accuracy
    base_std: float  # sample std (ddof = 1); nan for n < 2
    method_mean: float
    method_std: float
    delta_acc: float  # mean paired difference, method − Kaiming
    delta_err_pct: float  # −Δacc / (1 − Kaiming mean) · 100; nan when Kaiming is perfect
    t: float  # paired t statistic; nan when undefined
    p: float  # one-sided p (alternative: method > Kaiming); nan when undefined
    wins: int  # seeds where the method is strictly ahead
    ties: int  # seeds with equal accuracy
    sign_p: float  # one-sided sign test on wins among non-tied pairs; nan when all tie
    wilcoxon_p: float = math.nan  # one-sided Wilcoxon signed-rank p; nan when every Δ is 0
    ci_low: float = math.nan  # paired bootstrap 95 % CI of Δacc (BCa); nan for n < 3 or no
    ci_high: float = math.nan  # spread in the differences
    diff_std: float = math.nan  # sample std (ddof = 1) of the paired differences; nan for n < 2

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``nan`` → ``None``."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}


def paired_stats(method: Sequence[float], base: Sequence[float]) -> PairedStats:
    """Paired comparison of ``method`` against ``base`` (Kaiming), seed by seed.

    Args:
        method: final accuracies of the method, one per seed.
        base: the Kaiming accuracies of the same seeds, in the same order.

    Returns:
        :class:`PairedStats`; t and p from ``scipy.stats.ttest_rel(method, base,
        alternative='greater')``; the Wilcoxon signed-rank p from ``scipy.stats.wilcoxon(Δ,
        alternative='greater')``; a 95 % BCa bootstrap interval of mean Δ from
        ``scipy.stats.bootstrap`` (9999 resamples, a fixed seed, so tables are reproducible).

    Examples:
        >>> s = paired_stats([0.91, 0.93, 0.92], [0.90, 0.90, 0.91])
        >>> s.wins, round(s.delta_acc, 4)
        (3, 0.0167)
    """
    m = np.asarray(method, dtype=np.float64)
    k = np.asarray(base, dtype=np.float64)
    if m.shape != k.shape or m.ndim != 1:
        raise ValueError(f"method and base must be 1-D and paired, got shapes {m.shape} and "
                         f"{k.shape}")
    n = m.size
    if n == 0:
        raise ValueError("no pairs: both arms need at least one finished seed")
    d = m - k
    delta = float(d.mean())
    base_mean = float(k.mean())
    err = 1.0 - base_mean
    return PairedStats(
        n=n,
        base_mean=base_mean,
        base_std=float(k.std(ddof=1)) if n >= 2 else math.nan,
        method_mean=float(m.mean()),
        method_std=float(m.std(ddof=1)) if n >= 2 else math.nan,
        delta_acc=delta,
        delta_err_pct=-delta / err * 100.0 if err > 0 else math.nan,
        **_paired_tests(m, k, d),
        diff_std=float(d.std(ddof=1)) if n >= 2 else math.nan,
    )


def _paired_tests(m: np.ndarray, k: np.ndarray, d: np.ndarray) -> dict[str, Any]:
    """:class:`PairedStats`' tests of the differences ``d = m - k``: t and p, the wins and ties,
    the sign test, Wilcoxon's signed-rank p and the bootstrap interval (nan where undefined)."""
    n = d.size
    t = p = math.nan
    # Equal differences (up to rounding of the accuracies) make t 0/0 or x/0: undefined.
    if n >= 2 and np.ptp(d) > 1e-12:
        res = sps.ttest_rel(m, k, alternative="greater")
        t, p = float(res.statistic), float(res.pvalue)
    wins, ties = int((d > 0).sum()), int((d == 0).sum())
    decided = n - ties
    sign_p = (float(sps.binomtest(wins, decided, 0.5, alternative="greater").pvalue)
              if decided else math.nan)
    wilcoxon_p = ci_low = ci_high = math.nan
    if np.any(d != 0):
        wilcoxon_p = float(sps.wilcoxon(d, alternative="greater").pvalue)
    if n >= 3 and np.ptp(d) > 1e-12:
        ci = sps.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=9999,
                           rng=np.random.default_rng(0)).confidence_interval
        ci_low, ci_high = float(ci.low), float(ci.high)
    return {"t": t, "p": p, "wins": wins, "ties": ties, "sign_p": sign_p,
            "wilcoxon_p": wilcoxon_p, "ci_low": ci_low, "ci_high": ci_high}


def _check_design(sd: float, n: int, alpha: float) -> None:
    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise ValueError(f"power needs n >= 2 pairs, got {n!r}")
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"the SD of the paired differences must be finite and > 0, got {sd!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def power_at(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the one-sided paired t-test (alternative: mean Δ > 0) to detect a true mean
    difference ``delta`` from ``n`` pairs whose differences have standard deviation ``sd``.

    .. math::
        1 - \\beta = P\\left(T'_{n-1,\\,\\lambda} > t_{1-\\alpha,\\,n-1}\\right), \\qquad
        \\lambda = \\frac{\\delta\\sqrt{n}}{\\mathrm{SD}}

    with :math:`T'` noncentral t (``scipy.stats.nct``). Fashion-MNIST with 8 seeds, SD 0.0022,
    the paper's Δ +0.0016: power ≈ 0.58 (0.86 at SD 0.0015).

    Examples:
        >>> round(power_at(0.0016, 0.0022, 8), 2)
        0.58
    """
    _check_design(sd, n, alpha)
    df = n - 1
    crit = sps.t.ppf(1 - alpha, df)
    return float(sps.nct.sf(crit, df, delta * math.sqrt(n) / sd))


def min_detectable_delta(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean difference the one-sided paired t-test detects with probability
    ``power`` (:func:`power_at` solved for δ by Brent's method). Not ``t_{1-α,n-1}·SD/√n``: a
    true δ of that size has power ≈ 0.5 (the observed mean lands below it about half of the
    time). n = 8, SD 0.0022: 0.0022 at 80 % power, while t·SD/√n = 0.0015.
    """
    _check_design(sd, n, alpha)
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    from scipy.optimize import brentq

    hi = sd
    while power_at(hi, sd, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda d: power_at(d, sd, n, alpha) - power, 0.0, hi, xtol=1e-12 * sd))


def pooled_by_seed(replications: Sequence[dict[int, tuple[float, float]]]) -> tuple[
        list[int], list[float], list[float]]:
    """Replications of one protocol combined seed by seed: ``(seeds, method, base)`` where each
    seed's values are the means over the replications that have that seed (then
    :func:`paired_stats` of them is the pooled row).

    Each replication maps seed → (method, Kaiming). The pairs of different replications are not
    independent samples: the replications share their seeds, hence the initial weights and the
    data order, so one seed's effect appears once per replication. Pooling all pairs as if they
    were independent would count that effect several times and understate the standard error
    (a t on 16 "pairs" with 15 degrees of freedom, when there are 8 seeds). Averaging per seed
    first keeps one observation per seed, and the t-test's n is the number of seeds.
    """
    seeds = list(dict.fromkeys(sd for r in replications for sd in r))
    method, base = [], []
    for sd in seeds:
        have = [r[sd] for r in replications if sd in r]
        method.append(float(np.mean([m for m, _ in have])))
        base.append(float(np.mean([k for _, k in have])))
    return seeds, method, base


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (scipy has none): sort ascending,
    ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j))``; ``nan`` entries are left out of the
    family and stay ``nan``."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(~np.isnan(p))
    if idx.size:
        order = idx[np.argsort(p[idx], kind="stable")]
        m = order.size
        adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
        out[order] = np.maximum.accumulate(adj)
    return out.tolist()


MIN_PAIRS_FOR_MARKS = 5  # fewer pairs: the p-value is printed without significance marks


def significance(p: float, n: int = MIN_PAIRS_FOR_MARKS) -> str:
    """Table 3's markers: ``*`` p < 0.1, ``**`` p < 0.05, ``***`` p < 0.01; none from fewer than
    :data:`MIN_PAIRS_FOR_MARKS` pairs ``n`` (a t-test on 2–4 pairs is too fragile to star)."""
    if math.isnan(p) or n < MIN_PAIRS_FOR_MARKS:
        return ""
    return "***" if p < 0.01 else "**" if p < 0.05 else "*" if p < 0.1 else ""


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``0.9928 ± 0.0004``; just the mean when the std is undefined (one seed)."""
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_p(p: float, n: int = MIN_PAIRS_FOR_MARKS) -> str:
    """``0.0109**``; ``n/a`` when undefined (fewer than 2 pairs or zero variance); no marks from
    fewer than :data:`MIN_PAIRS_FOR_MARKS` pairs ``n``."""
    return "n/a" if math.isnan(p) else f"{p:.4f}{significance(p, n)}"


def _signed(x: float, digits: int = 4, suffix: str = "") -> str:
    if math.isnan(x):
        return "n/a"
    text = f"{x:+.{digits}f}"
    if float(text) == 0:
        text = f"{0:+.{digits}f}"  # no "-0.00"
    return text + suffix


def _ci(s: PairedStats) -> str:
    if math.isnan(s.ci_low):
        return "n/a"
    return f"[{_signed(s.ci_low)}, {_signed(s.ci_high)}]"


def power_columns(s: PairedStats, paper_delta: float | None) -> tuple[str, str]:
    """``(power at the paper's Δ, minimum detectable Δ at 80 % power)`` as table cells, from the
    observed SD of the paired differences (one-sided α 0.05; :func:`power_at`,
    :func:`min_detectable_delta`); ``n/a`` when the SD is undefined or 0, or there is no Δ."""
    if s.n < 2 or not (math.isfinite(s.diff_std) and s.diff_std > 0):
        return "n/a", "n/a"
    pw = "n/a" if paper_delta is None else f"{power_at(paper_delta, s.diff_std, s.n):.2f}"
    return pw, f"{min_detectable_delta(s.diff_std, s.n):.4f}"


def table3_markdown(rows: Sequence[tuple[str, str, PairedStats]],
                    paper_deltas: Sequence[float | None] | None = None) -> str:
    """Table 3 as Markdown: one row per (dataset title, method name, stats), with the paper's
    columns and five more: the Wilcoxon signed-rank p, the bootstrap 95 % CI of Δacc, the
    t-test p Holm-adjusted across the datasets of each method, the power to detect the paper's
    Δacc of that dataset (``paper_deltas``, one per row; None: n/a) and the minimum Δacc
    detectable at 80 % power, both from the observed SD of the differences (:func:`power_columns`).

    A method compared on several datasets gets a ``Mean`` row of Δacc and Δerr%, as in the paper.
    """
    adjusted: dict[int, float] = {}
    for method in dict.fromkeys(m for _, m, _ in rows):
        mine = [i for i, (_, m, _) in enumerate(rows) if m == method]
        for i, a in zip(mine, holm([rows[i][2].p for i in mine]), strict=True):
            adjusted[i] = a
    out = ["| Dataset | Method | n | Kaiming | Method acc | Δacc | Δerr% | p | wins | "
           "Wilcoxon p | 95 % CI Δacc | p (Holm) | power at paper Δ | MDΔ 80 % |",
           "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: "
           "| ---: |"]
    deltas = list(paper_deltas) if paper_deltas is not None else [None] * len(rows)
    for i, (title, method, s) in enumerate(rows):
        pw, mdd = power_columns(s, deltas[i])
        out.append(
            f"| {title} | {method} | {s.n} | {format_mean_std(s.base_mean, s.base_std)} | "
            f"{format_mean_std(s.method_mean, s.method_std)} | {_signed(s.delta_acc)} | "
            f"{_signed(s.delta_err_pct, 2, '%')} | {format_p(s.p, s.n)} | {s.wins}/{s.n} | "
            f"{format_p(s.wilcoxon_p, s.n)} | {_ci(s)} | {format_p(adjusted[i], s.n)} | {pw} | "
            f"{mdd} |"
        )
    methods = list(dict.fromkeys(m for _, m, _ in rows))
    for method in methods:
        mine = [s for _, m, s in rows if m == method]
        if len(mine) > 1:
            dacc = float(np.mean([s.delta_acc for s in mine]))
            derr = float(np.mean([s.delta_err_pct for s in mine]))
            out.append(f"| Mean | {method} | | | | {_signed(dacc)} | {_signed(derr, 2, '%')} | "
                       "| | | | | | |")
    return "\n".join(out)
