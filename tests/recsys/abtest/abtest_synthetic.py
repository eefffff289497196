"""Synthetic experiment events for the analysis tests (no replay needed)."""

from __future__ import annotations

import numpy as np

from recsys.abtest.assignment import assign_arms
from recsys.abtest.experiment import Experiment, experiment_from_dict
from recsys.abtest.usertable import Events

T0 = 1_000_000
DAY = 86_400


def experiment(weights=(0.5, 0.25, 0.25), **extra) -> Experiment:
    names = ["control", "good", "same"][: len(weights)]
    return experiment_from_dict(
        {
            "name": "synthetic",
            "salt": "syn-1",
            "primary_metric": "ndcg@10",
            "guardrail_metrics": ["hr@10"],
            "secondary_metrics": ["request_rate"],
            "arms": [
                {"name": n, "weight": w, "policy": {"kind": "static" if i == 0 else "system"}}
                for i, (n, w) in enumerate(zip(names, weights, strict=True))
            ],
            "analysis": {"bootstrap": 200},
            **extra,
        }
    )


def events(
    exp: Experiment,
    *,
    users: int = 600,
    per_user: int = 20,
    days: int = 14,
    lift: float = 0.8,
    seed: int = 0,
    arm_weights: tuple[float, ...] | None = None,
):
    """(user_ids [U], arms [U], experiment Events, pre-period Events).

    Each user has a skill; ranks are log-normal around it; arm "good" ranks better by
    ``lift`` (log scale). Pre-period events share the skill (a correlated covariate).
    ``arm_weights`` overrides the split used to assign (to break it on purpose).
    """
    rng = np.random.default_rng(seed)
    ids = np.array([f"user-{i}" for i in range(users)])
    pairs = (
        exp.arm_pairs
        if arm_weights is None
        else [(a.name, w) for a, w in zip(exp.arms, arm_weights, strict=True)]
    )
    arm_idx = assign_arms(exp.salt, ids.tolist(), pairs)
    arms = np.array([a.name for a in exp.arms])[arm_idx]
    skill = rng.normal(0, 1, users)
    e = users * per_user
    eu = np.repeat(np.arange(users), per_user)
    boost = np.where(arms[eu] == "good", lift, 0.0)
    rank = np.maximum(1, np.exp(rng.normal(2.5 - skill[eu] - boost, 1.2))).astype(np.int64)
    first_day = rng.integers(0, days, users)  # users arrive over the days
    ts = (
        T0
        + (first_day[eu] + rng.integers(0, 3, e)).clip(max=days - 1) * DAY
        + rng.integers(0, DAY, e)
    )
    ev = Events(
        eu,
        ts,
        rank=rank,
        auc=rng.uniform(0.6, 1, e),
        requested=(arms[eu] != "control") & (rng.random(e) < 0.2),
    )
    pre_rank = np.maximum(1, np.exp(rng.normal(2.5 - skill[eu], 1.2))).astype(np.int64)
    pre = Events(
        eu, ts - 30 * DAY, rank=pre_rank, auc=rng.uniform(0.6, 1, e), requested=np.zeros(e)
    )
    return ids, arms, ev, pre
