"""The validation studies run on synthetic per-user data (the CLI runs them on the replay)."""

from __future__ import annotations

import numpy as np
from abtest_synthetic import T0, events, experiment

from recsys.abtest.studies import ReplayBase, aa_study, cuped_study, planted_study, srm_study
from recsys.abtest.usertable import summarise


def base() -> ReplayBase:
    exp = experiment(weights=(0.5, 0.5))
    ids, _, ev, pre = events(exp, users=400, per_user=4, days=10, lift=0.0)
    everyone = np.full(len(ids), "all")
    users, daily = summarise(
        ids, everyone, ev, metrics=["ndcg@10", "hr@10", "mrr@10", "auc"], start=T0, pre_events=pre
    )
    return ReplayBase(users, daily, {})


def test_aa_study_rates_are_near_nominal() -> None:
    aa = aa_study(base(), simulations=300, alpha=0.05)
    assert aa["users"] == 400 and aa["days"] == 10
    assert 0.01 <= aa["fixed_horizon"]["rate"] <= 0.10
    assert aa["sequential"]["rate"] <= aa["naive_daily_peeking"]["rate"]
    assert aa["sequential"]["rate"] <= 0.08
    assert aa["se_ratio_cuped"] < 0.95  # the synthetic covariate is correlated
    lo, hi = aa["fixed_horizon"]["ci_low"], aa["fixed_horizon"]["ci_high"]
    assert lo <= aa["fixed_horizon"]["rate"] <= hi


def test_planted_srm_and_cuped_studies() -> None:
    b = base()
    rows = planted_study(
        b.users.values["ndcg@10"],
        users_per_arm=300,
        lifts_rel=(0.0, 0.3),
        simulations=400,
        alpha=0.05,
    )
    assert abs(rows[0]["predicted_power"] - 0.05) < 1e-6  # no lift: power = alpha
    assert abs(rows[1]["measured"]["rate"] - rows[1]["predicted_power"]) < 0.1
    srm = srm_study(sizes=(4000,), simulations=30)
    broken, fine = srm
    assert broken["alarm"]["rate"] > 0.9 and fine["alarm"]["rate"] < 0.1
    cuped = {r["metric"]: r for r in cuped_study(b)}
    assert cuped["ndcg@10"]["variance_reduction"] > 0.1
