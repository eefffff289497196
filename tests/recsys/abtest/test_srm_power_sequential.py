"""SRM check, power calculator vs simulation, mSPRT under peeking."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.abtest.assignment import assign_arms
from recsys.abtest.power import mde, power_of, users_needed
from recsys.abtest.sequential import msprt
from recsys.abtest.srm import srm_check
from recsys.abtest.stats import welch_from_moments
from recsys.errors import ValidationError


def test_srm_flags_a_55_45_split_analysed_as_50_50() -> None:
    users = [f"u{i}" for i in range(10_000)]
    broken = np.bincount(assign_arms("srm", users, [("a", 0.55), ("b", 0.45)]), minlength=2)
    res = srm_check({"a": int(broken[0]), "b": int(broken[1])}, {"a": 0.5, "b": 0.5})
    assert res["flag"] and res["p_value"] < 1e-10
    fine = np.bincount(assign_arms("srm", users, [("a", 0.5), ("b", 0.5)]), minlength=2)
    res = srm_check({"a": int(fine[0]), "b": int(fine[1])}, {"a": 0.5, "b": 0.5})
    assert not res["flag"]


def test_srm_errors() -> None:
    with pytest.raises(ValidationError, match="does not define"):
        srm_check({"a": 5, "zzz": 5}, {"a": 0.5, "b": 0.5})
    with pytest.raises(ValidationError, match="no users"):
        srm_check({}, {"a": 0.5, "b": 0.5})


def test_power_calculator_agrees_with_simulation() -> None:
    rng = np.random.default_rng(0)
    n, sd, sims = 150, 1.0, 2000
    delta = mde(n_c=n, n_t=n, sd=sd, alpha=0.05, power=0.6)
    assert power_of(delta, n_c=n, n_t=n, sd=sd) == pytest.approx(0.6, abs=1e-6)
    t = rng.normal(delta, sd, (sims, n))
    c = rng.normal(0, sd, (sims, n))
    p = welch_from_moments(n, t.mean(1), t.var(1, ddof=1), n, c.mean(1), c.var(1, ddof=1))[
        "p_value"
    ]
    measured = (p < 0.05).mean()
    assert abs(measured - 0.6) < 4 * np.sqrt(0.6 * 0.4 / sims)
    assert users_needed(delta, sd=sd, power=0.6) == pytest.approx(n, rel=1e-3)


def _peeking_sims(effect: float, sims: int, looks: int, per_look: int, seed: int):
    """Cumulative two-arm normal data with ``looks`` looks: d and V per look, [S, L]."""
    rng = np.random.default_rng(seed)
    t = rng.normal(effect, 1, (sims, looks * per_look)).reshape(sims, looks, per_look)
    c = rng.normal(0, 1, (sims, looks * per_look)).reshape(sims, looks, per_look)
    n = per_look * np.arange(1, looks + 1)

    def moments(x):
        s1, s2 = np.cumsum(x.sum(2), 1), np.cumsum((x**2).sum(2), 1)
        m = s1 / n
        return m, (s2 - n * m**2) / (n - 1)

    mt, vt = moments(t)
    mc, vc = moments(c)
    return mt - mc, vt / n + vc / n, n


def test_msprt_keeps_the_error_rate_under_peeking() -> None:
    d, v, _ = _peeking_sims(0.0, sims=2000, looks=50, per_look=20, seed=1)
    res = msprt(d, v, tau=0.3, alpha=0.05)
    fpr = res["reject"][:, -1].mean()
    assert fpr <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 2000)
    # peeking at a fixed-horizon z-test every look would be far above 5 %
    naive = (np.abs(d / np.sqrt(v)) > 1.96).any(axis=1).mean()
    assert naive > 0.15
    # the confidence sequence excludes 0 exactly when the test rejects
    outside = (res["cs_low"] > 0) | (res["cs_high"] < 0)
    np.testing.assert_array_equal(outside[:, -1], res["reject"][:, -1])


def test_msprt_detects_a_real_effect() -> None:
    d, v, _ = _peeking_sims(0.3, sims=300, looks=30, per_look=20, seed=2)
    res = msprt(d, v, tau=0.3, alpha=0.05)
    assert res["reject"][:, -1].mean() > 0.9
    assert np.all(np.diff(res["p_value"], axis=1) <= 0)  # always-valid p only decreases
