"""Paired statistics against values computed by hand."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from prewarm_gpu.stats import (
    PairedStats,
    format_mean_std,
    format_p,
    holm,
    min_detectable_delta,
    paired_stats,
    pooled_by_seed,
    power_at,
    significance,
    table3_markdown,
)


def _t3_sf(t: float) -> float:
    """One-sided p of Student's t with 3 degrees of freedom, closed form:
    P(T > t) = 1/2 − (1/π)·(u/(1 + u²) + atan u), u = t/√3."""
    u = t / math.sqrt(3)
    return 0.5 - (u / (1 + u * u) + math.atan(u)) / math.pi


def test_four_pairs_by_hand():
    method = [0.93, 0.95, 0.94, 0.96]
    base = [0.92, 0.93, 0.93, 0.95]
    # d = (0.01, 0.02, 0.01, 0.01): mean 0.0125; sample sd sqrt((3·0.0025² + 0.0075²)/3) = 0.005;
    # t = 0.0125 / (0.005 / √4) = 5, df = 3.
    s = paired_stats(method, base)
    assert s.n == 4 and s.wins == 4 and s.ties == 0
    assert s.delta_acc == pytest.approx(0.0125, abs=1e-12)
    assert s.t == pytest.approx(5.0, rel=1e-9)
    assert s.p == pytest.approx(_t3_sf(5.0), rel=1e-9)  # ≈ 0.00770
    assert s.p == pytest.approx(0.0077, abs=5e-5)
    assert s.base_mean == pytest.approx(0.9325) and s.method_mean == pytest.approx(0.945)
    # base: deviations (−0.0125, −0.0025, −0.0025, 0.0175); ss = 4.75e-4; sd = sqrt(4.75e-4 / 3)
    assert s.base_std == pytest.approx(math.sqrt(4.75e-4 / 3), rel=1e-9)
    assert s.method_std == pytest.approx(math.sqrt(5e-4 / 3), rel=1e-9)
    # Δerr% = −0.0125 / (1 − 0.9325) · 100
    assert s.delta_err_pct == pytest.approx(-0.0125 / 0.0675 * 100, rel=1e-9)
    assert s.sign_p == pytest.approx(1 / 16)  # 4/4 wins: 0.5⁴


def test_same_as_scipy_ttest_rel_greater_and_direction_matters():
    m, k = [0.5, 0.52, 0.49, 0.55, 0.51], [0.5, 0.5, 0.5, 0.5, 0.5]
    ref = sps.ttest_rel(m, k, alternative="greater")
    s = paired_stats(m, k)
    assert s.t == pytest.approx(ref.statistic) and s.p == pytest.approx(ref.pvalue)
    assert paired_stats(k, m).p == pytest.approx(1 - ref.pvalue)
    assert s.wins == 3 and s.ties == 1


def test_paper_mnist_delta_err():
    # Table 3, MNIST: Δacc +0.0005 over Kaiming 0.9928 → −6.94 %.
    s = paired_stats([0.9933], [0.9928])
    assert round(s.delta_err_pct, 2) == -6.94


def test_sign_test_values_of_the_notes():
    for wins, p in ((8, 0.0039), (7, 0.0352), (6, 0.1445)):
        s = paired_stats([1.0] * wins + [0.0] * (8 - wins), [0.5] * 8)
        assert s.sign_p == pytest.approx(p, abs=1e-4)


def test_one_pair_is_undefined_not_an_error():
    s = paired_stats([0.9], [0.8])
    assert s.n == 1 and math.isnan(s.t) and math.isnan(s.p) and math.isnan(s.base_std)
    assert s.wins == 1 and s.delta_acc == pytest.approx(0.1)
    assert s.as_dict()["p"] is None and s.as_dict()["base_std"] is None
    assert format_p(s.p) == "n/a" and format_mean_std(0.9, s.method_std) == "0.9000"


def test_zero_variance_of_differences_gives_nan_p():
    # Every pair differs by exactly 1/360 (one test image): t would be x/0.
    k = [0.95, 0.96, 0.97]
    s = paired_stats([x + 1 / 360 for x in k], k)
    assert math.isnan(s.p) and math.isnan(s.t) and s.wins == 3
    ties = paired_stats(k, k)
    assert math.isnan(ties.p) and ties.ties == 3 and ties.wins == 0 and math.isnan(ties.sign_p)


def test_perfect_kaiming_gives_undefined_delta_err():
    assert math.isnan(paired_stats([1.0, 1.0], [1.0, 1.0]).delta_err_pct)


def test_bad_input():
    with pytest.raises(ValueError, match="paired"):
        paired_stats([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="no pairs"):
        paired_stats([], [])


@pytest.mark.parametrize("p, stars", [(0.0007, "***"), (0.0109, "**"), (0.07, "*"), (0.2, ""),
                                      (math.nan, "")])
def test_significance_markers(p, stars):
    assert significance(p) == stars


@pytest.mark.parametrize("n, stars", [(2, ""), (4, ""), (5, "***"), (8, "***")])
def test_significance_needs_five_pairs(n, stars):
    assert significance(0.001, n) == stars
    assert format_p(0.001, n) == "0.0010" + stars


def test_wilcoxon_is_one_sided_and_exact_on_small_samples():
    # Four positive, distinct differences: W+ = 1+2+3+4 = 10, its largest value; exact one-sided
    # p = P(W+ >= 10) = 1/2**4.
    s = paired_stats([0.91, 0.92, 0.93, 0.94], [0.90, 0.90, 0.90, 0.90])
    assert s.wilcoxon_p == pytest.approx(1 / 16)
    worse = paired_stats([0.90, 0.90, 0.90, 0.90], [0.91, 0.92, 0.93, 0.94])
    assert worse.wilcoxon_p == pytest.approx(1.0)
    assert math.isnan(paired_stats([0.9, 0.8], [0.9, 0.8]).wilcoxon_p)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    m, k = [0.93, 0.95, 0.94, 0.96, 0.92], [0.92, 0.93, 0.93, 0.95, 0.93]
    s, again = paired_stats(m, k), paired_stats(m, k)
    d = np.subtract(m, k)
    assert d.min() - 1e-12 <= s.ci_low < s.delta_acc < s.ci_high <= d.max() + 1e-12
    assert (s.ci_low, s.ci_high) == (again.ci_low, again.ci_high)
    assert math.isnan(paired_stats([0.9, 0.8], [0.8, 0.8]).ci_low)  # n < 3


@pytest.mark.parametrize("p, want", [
    ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),  # 3·0.01; max(3·0.01, 2·0.03); max(0.06, 1·0.04)
    ([math.nan, 0.02, 0.01], [math.nan, 0.02, 0.02]),
    ([0.5, 0.6], [1.0, 1.0]),
])
def test_holm_by_hand(p, want):
    got = holm(p)
    assert np.allclose(got, want, equal_nan=True)


def test_table3_markdown_rows_and_mean_row():
    a = paired_stats([0.93, 0.95, 0.94, 0.96], [0.92, 0.93, 0.93, 0.95])
    b = paired_stats([0.9], [0.9])
    table = table3_markdown([("MNIST", "prewarm", a), ("SVHN", "prewarm", b)])
    lines = table.splitlines()
    assert lines[0].startswith("| Dataset | Method | n | Kaiming |")
    # p = 0.0077 from 4 pairs: printed, but not starred (marks need >= 5 pairs)
    row = next(ln for ln in lines if ln.startswith("| MNIST"))
    assert row.startswith("| MNIST | prewarm | 4 | 0.9325 ± 0.0126 | 0.9450 ± 0.0129 | +0.0125 | "
                          "-18.52% | 0.0077 | 4/4 | ")
    # the Holm family of prewarm is {0.0077, n/a}: one p, unadjusted
    # no paper Δ given: power n/a; the minimum detectable Δ from the 4 differences' SD
    mdd = min_detectable_delta(float(np.std([0.01, 0.02, 0.01, 0.01], ddof=1)), 4)
    assert row.endswith(f"| {a.wilcoxon_p:.4f} | [{a.ci_low:+.4f}, {a.ci_high:+.4f}] | 0.0077 | "
                        f"n/a | {mdd:.4f} |")
    assert "| SVHN | prewarm | 1 | 0.9000 | 0.9000 | +0.0000 | +0.00% | n/a | 0/1 | n/a | n/a | " \
           "n/a | n/a | n/a |" in lines
    mean = [ln for ln in lines if ln.startswith("| Mean | prewarm")]
    assert mean and "| +0.006" in mean[0] and "| -9.26% |" in mean[0]  # (0.0125 + 0) / 2
    assert isinstance(a, PairedStats)


# --- power and pooling ----------------------------------------------------------------------------

@pytest.mark.parametrize("delta, sd, n", [(0.0016, 0.0022, 8), (0.0016, 0.0015, 8), (1.0, 2.0, 15)])
def test_power_is_the_noncentral_t_tail_beyond_the_one_sided_critical_value(delta, sd, n):
    crit = sps.t.ppf(0.95, n - 1)  # one-sided α 0.05
    want = sps.nct.sf(crit, n - 1, delta * math.sqrt(n) / sd)
    assert power_at(delta, sd, n) == pytest.approx(want, rel=1e-12)


def test_power_of_the_fashion_mnist_design_is_a_coin_flip_not_80_percent():
    # the numbers: SD 0.0022 → ≈ 0.58; SD 0.0015 (He-normal) → ≈ 0.86; 15 seeds → ≥ 0.8
    assert power_at(0.0016, 0.0022, 8) == pytest.approx(0.5828, abs=1e-3)
    assert power_at(0.0016, 0.0015, 8) == pytest.approx(0.8563, abs=1e-3)
    assert power_at(0.0016, 0.0022, 14) < 0.83 and power_at(0.0016, 0.0022, 15) > 0.84


def test_min_detectable_delta_has_the_asked_power_and_exceeds_t_sd_over_root_n():
    sd, n = 0.0022, 8
    d80 = min_detectable_delta(sd, n)
    assert power_at(d80, sd, n) == pytest.approx(0.8, abs=1e-9)
    naive = sps.t.ppf(0.95, n - 1) * sd / math.sqrt(n)  # 1.895·SD/√8: power ≈ 0.5, not 0.8
    assert 0.5 < power_at(naive, sd, n) < 0.55 and d80 > 1.4 * naive


@pytest.mark.parametrize("args", [(0.001, 0.0, 8), (0.001, 0.002, 1), (0.001, math.nan, 8)])
def test_power_refuses_an_undefined_design(args):
    with pytest.raises(ValueError, match="SD|n >= 2"):
        power_at(*args)


def test_pooled_by_seed_averages_each_seed_over_the_replications_that_have_it():
    a = {1: (0.93, 0.92), 2: (0.95, 0.93), 3: (0.90, 0.91)}
    b = {1: (0.94, 0.92), 2: (0.93, 0.93)}  # seed 3 only in the first replication
    seeds, m, k = pooled_by_seed([a, b])
    assert seeds == [1, 2, 3]
    np.testing.assert_allclose(m, [0.935, 0.94, 0.90])
    np.testing.assert_allclose(k, [0.92, 0.93, 0.91])
    # the pooled test is the paired t on 3 per-seed mean differences (+0.015, +0.010, −0.010)
    d = np.array([0.015, 0.010, -0.010])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    s = paired_stats(m, k)
    assert s.n == 3 and s.t == pytest.approx(t) and s.p == pytest.approx(sps.t.sf(t, 2))
