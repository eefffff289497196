"""Welch against scipy/statsmodels, bootstrap coverage, CUPED variance reduction and bias."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from recsys.abtest.stats import bootstrap_diff, cuped_adjust, welch, welch_from_moments
from recsys.errors import ValidationError


def test_welch_matches_scipy_and_statsmodels() -> None:
    rng = np.random.default_rng(1)
    t, c = rng.exponential(1.2, 80), rng.exponential(1.0, 130)
    r = welch(t, c, alpha=0.05)
    ref = sps.ttest_ind(t, c, equal_var=False)
    assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert r["t"] == pytest.approx(ref.statistic, rel=1e-10)
    lo, hi = CompareMeans(DescrStatsW(t), DescrStatsW(c)).tconfint_diff(
        alpha=0.05, usevar="unequal"
    )
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), rel=1e-10)
    ci = ref.confidence_interval(0.9)
    r90 = welch(t, c, alpha=0.1)
    assert (r90["ci_low"], r90["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert r["rel"] == pytest.approx(t.mean() / c.mean() - 1)


def test_welch_vectorised_over_a_batch() -> None:
    rng = np.random.default_rng(2)
    t, c = rng.normal(size=(5, 40)), rng.normal(size=(5, 50))
    batch = welch_from_moments(40, t.mean(1), t.var(1, ddof=1), 50, c.mean(1), c.var(1, ddof=1))
    for i in range(5):
        assert batch["p_value"][i] == pytest.approx(
            sps.ttest_ind(t[i], c[i], equal_var=False).pvalue
        )


def test_bad_samples_are_rejected() -> None:
    with pytest.raises(ValidationError, match=">= 2 users"):
        welch(np.array([1.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValidationError, match="NaN"):
        welch(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


def test_bootstrap_ci_covers_the_true_difference() -> None:
    rng = np.random.default_rng(3)
    true = 0.3
    covered = 0
    sims = 60
    for s in range(sims):
        t = rng.exponential(1.0, 60) + true
        c = rng.exponential(1.0, 60)
        b = bootstrap_diff(t, c, resamples=400, seed=s)
        assert b["ci_low"] < b["ci_high"]
        covered += b["ci_low"] <= true <= b["ci_high"]
    # 95 % nominal; with 60 simulations, >= 50 covers is P > 0.99 if the coverage is ~0.95
    assert covered >= 50


def test_bootstrap_agrees_with_welch_on_normal_data() -> None:
    rng = np.random.default_rng(4)
    t, c = rng.normal(1.0, 1, 400), rng.normal(0.8, 1, 400)
    w, b = welch(t, c), bootstrap_diff(t, c, resamples=1000)
    assert b["ci_low"] == pytest.approx(w["ci_low"], abs=0.03)
    assert b["ci_high"] == pytest.approx(w["ci_high"], abs=0.03)


def test_cuped_reduces_variance_and_stays_unbiased() -> None:
    rng = np.random.default_rng(5)
    sims, n, effect = 400, 200, 0.2
    raw_diffs, adj_diffs, reductions = [], [], []
    for _ in range(sims):
        x = rng.normal(0, 1, n)  # pre-period covariate
        group = rng.integers(0, 2, n)
        y = 0.8 * x + rng.normal(0, 0.6, n) + effect * group  # corr(y, x) = 0.8
        x_missing = np.where(rng.random(n) < 0.1, np.nan, x)  # some users without covariate
        y_adj, info = cuped_adjust(y, x_missing, group)
        reductions.append(info["variance_reduction"])
        raw_diffs.append(y[group == 1].mean() - y[group == 0].mean())
        adj_diffs.append(y_adj[group == 1].mean() - y_adj[group == 0].mean())
    raw_diffs, adj_diffs = np.array(raw_diffs), np.array(adj_diffs)
    # unbiased: the mean adjusted difference is the effect within 3 standard errors
    assert abs(adj_diffs.mean() - effect) < 3 * adj_diffs.std() / np.sqrt(sims)
    # variance of the estimate shrinks by about rho^2 = 0.64 (90 % of users have x)
    assert adj_diffs.var() < 0.55 * raw_diffs.var()
    assert np.mean(reductions) == pytest.approx(0.64 * 0.9, abs=0.08)


def test_cuped_without_usable_covariate_is_a_no_op() -> None:
    y = np.arange(10.0)
    g = np.arange(10) % 2
    adj, info = cuped_adjust(y, np.full(10, np.nan), g)
    np.testing.assert_array_equal(adj, y)
    assert info["variance_reduction"] == 0.0 and info["n_with_covariate"] == 0
    adj, info = cuped_adjust(y, np.ones(10), g)  # constant covariate
    np.testing.assert_array_equal(adj, y)
