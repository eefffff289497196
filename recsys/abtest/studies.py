"""Validation studies of the statistics (``recsys abtest validate``), vectorised over
simulations with numpy.

1. **A/A on the replay** (:func:`aa_study`): the ml-100k replay users, all under the static
   model, are re-split 50/50 by S different salts (the real hash assignment). With no
   true difference, the fixed-horizon Welch test (and its CUPED version) should reject in
   about alpha of the salts (measured rate with its Clopper-Pearson interval,
   :func:`statsmodels.stats.proportion.proportion_confint`); the mSPRT evaluated at the end
   of every day should reject in at most alpha, while "peeking" at the Welch p-value every
   day and stopping at the first p < alpha rejects far more often.
2. **Planted effect** (:func:`planted_study`): synthetic per-user metrics (drawn from the
   replay's per-user NDCG@10 distribution, so skewed and zero-inflated like the real ones)
   with a known additive lift in the treatment arm; the share of simulations in which the
   Welch test detects it is compared with the power the calculator predicts
   (:mod:`recsys.abtest.power`), with the binomial interval of the measured rate.
3. **SRM** (:func:`srm_study`): users hashed into a 55/45 split but analysed as 50/50
   (alarm rate at several sizes), and a correct 50/50 split (false-alarm rate, nominal
   0.1 %).
4. **CUPED on the replay** (:func:`cuped_study`): variance reduction of every metric with
   the pre-period covariate, and the average shrinkage of the A/A standard errors.

Example::

    base = replay_base(ds, cache=cache, pre_events=10)
    aa = aa_study(base, simulations=1000, alpha=0.05)
    aa["fixed_horizon"]["rate"], aa["sequential"]["rate"]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from recsys.abtest.analysis import arm_moments, daily_values
from recsys.abtest.assignment import assign_arms
from recsys.abtest.power import power_of
from recsys.abtest.sequential import msprt
from recsys.abtest.srm import srm_chisquare
from recsys.abtest.stats import cuped_adjust, welch_from_moments
from recsys.abtest.usertable import DailyTable, UserTable
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

METRICS = ["ndcg@10", "hr@10", "mrr@10", "auc"]
TAU_SCALE = 0.3  # default of AnalysisConfig.tau_scale
SEQ_MIN_USERS = 20  # default of AnalysisConfig.sequential_min_users


@dataclass
class ReplayBase:
    """Every replay user's per-user metrics under the static model (no assignment)."""

    users: UserTable
    daily: DailyTable
    info: dict


def replay_base(
    ds,
    *,
    cache: Path,
    pre_events: int = 10,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> ReplayBase:
    """Replay the static model over the replay period once and build the tables (every
    user in one pseudo-arm; studies re-assign them)."""
    from recsys.abtest.runner import STATIC, build_tables, replay_users
    from recsys.replay import ReplayConfig, run_replay

    run = run_replay(
        ds, ReplayConfig(seed=seed, quick=quick), [STATIC], cache=cache, progress=progress
    )
    user_index = replay_users(run.records)
    user_ids = np.asarray(ds.user_ids, dtype=object)[user_index].astype(str)
    users, daily, info = build_tables(
        run.records,
        {"all": STATIC.label},
        user_index,
        user_ids,
        np.full(len(user_ids), "all"),
        metrics=METRICS,
        pre_events=pre_events,
    )
    info["replay_seconds"] = run.meta["seconds"]["total"]
    return ReplayBase(users, daily, info)


def rate(k: int, n: int, alpha: float = 0.05) -> dict:
    """Observed proportion with its Clopper-Pearson (exact) interval."""
    lo, hi = proportion_confint(k, n, alpha=alpha, method="beta")
    return {"count": int(k), "n": int(n), "rate": k / n, "ci_low": float(lo), "ci_high": float(hi)}


def salt_masks(user_ids: np.ndarray, simulations: int, seed: int) -> np.ndarray:
    """[S, U] bool: treatment membership under S salts (50/50, the real hash)."""
    arms = [("a", 0.5), ("b", 0.5)]
    ids = [str(u) for u in user_ids]
    return np.stack([assign_arms(f"aa-{seed}-{s}", ids, arms) == 1 for s in range(simulations)])


def _welch_masks(y: np.ndarray, masks: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """Welch of mask vs ~mask for each row of masks [S, U]; y [U] -> arrays [S]."""
    active = np.ones((1, len(y)), bool)
    n1, m1, v1 = arm_moments(y[None, :], active, masks)
    n0, m0, v0 = arm_moments(y[None, :], active, ~masks)
    return welch_from_moments(n1[:, 0], m1[:, 0], v1[:, 0], n0[:, 0], m0[:, 0], v0[:, 0], alpha)


def aa_study(
    base: ReplayBase, *, simulations: int, alpha: float, seed: int = 0, metric: str = "ndcg@10"
) -> dict:
    """A/A false-positive rates over ``simulations`` salts (see the module docstring)."""
    users, daily = base.users, base.daily
    masks = salt_masks(users.user_id, simulations, seed)  # [S, U]
    y = users.values[metric]
    fixed = _welch_masks(y, masks, alpha)
    group = np.zeros(len(y), np.int64)
    y_adj, _ = cuped_adjust(y, users.pre[metric], group)
    fixed_cuped = _welch_masks(y_adj, masks, alpha)

    values, active = daily_values(daily, metric)  # [D, U]
    n1, m1, v1 = arm_moments(values, active, masks)  # [S, D]
    n0, m0, v0 = arm_moments(values, active, ~masks)
    d = m1 - m0
    var = v1 / n1 + v0 / n0
    var = np.where(np.minimum(n1, n0) >= SEQ_MIN_USERS, var, np.nan)
    pre = users.pre[metric]
    tau = TAU_SCALE * float(np.nanstd(pre, ddof=1))
    seq = msprt(d, var, tau, alpha)
    looks = np.isfinite(var)
    daily_p = welch_from_moments(n1, m1, v1, n0, m0, v0, alpha)["p_value"]  # [S, D]
    peeking = np.any(looks & (daily_p < alpha), axis=1)
    rejected_fixed = fixed["p_value"] < alpha
    return {
        "metric": metric,
        "simulations": simulations,
        "alpha": alpha,
        "users": len(y),
        "days": len(daily.days),
        "looks_per_salt_mean": float(looks.sum(axis=1).mean()),
        "tau": tau,
        "fixed_horizon": rate(int(rejected_fixed.sum()), simulations),
        "fixed_horizon_cuped": rate(int((fixed_cuped["p_value"] < alpha).sum()), simulations),
        "sequential": rate(int(seq["reject"][:, -1].sum()), simulations),
        "naive_daily_peeking": rate(int(peeking.sum()), simulations),
        "p_values": fixed["p_value"],
        "se_ratio_cuped": float(np.mean(fixed_cuped["se"] / fixed["se"])),
    }


def planted_study(
    base_values: np.ndarray,
    *,
    users_per_arm: int,
    lifts_rel: tuple[float, ...],
    simulations: int,
    alpha: float,
    seed: int = 0,
) -> list[dict]:
    """Detection rate of a planted additive lift vs the calculator's power.

    Per simulation, both arms draw ``users_per_arm`` per-user values from
    ``base_values`` [U] (with replacement); the treatment gets ``+ lift * mean``.
    """
    rng = np.random.default_rng(seed)
    mean = float(np.mean(base_values))
    sd = float(np.std(base_values, ddof=1))
    rows = []
    for lift in lifts_rel:
        delta = lift * mean
        c = rng.choice(base_values, size=(simulations, users_per_arm))  # [S, N]
        t = rng.choice(base_values, size=(simulations, users_per_arm)) + delta
        res = welch_from_moments(
            users_per_arm,
            t.mean(1),
            t.var(1, ddof=1),
            users_per_arm,
            c.mean(1),
            c.var(1, ddof=1),
            alpha,
        )
        detected = int((res["p_value"] < alpha).sum())
        predicted = power_of(delta, n_c=users_per_arm, n_t=users_per_arm, sd=sd, alpha=alpha)
        measured = rate(detected, simulations)
        se = np.sqrt(predicted * (1 - predicted) / simulations)
        rows.append(
            {
                "lift_rel": lift,
                "lift_abs": delta,
                "users_per_arm": users_per_arm,
                "predicted_power": predicted,
                "measured": measured,
                "z": (measured["rate"] - predicted) / se if se > 0 else 0.0,
                "agrees": measured["ci_low"] <= predicted <= measured["ci_high"],
            }
        )
    return rows


def srm_study(
    *, sizes: tuple[int, ...], simulations: int, seed: int = 0, threshold: float = 1e-3
) -> list[dict]:
    """SRM alarm rates for a 55/45 split analysed as 50/50, and for a correct 50/50 split.

    Users are synthetic ids hashed with S salts by the real assignment function.
    """
    rows = []
    for n in sizes:
        ids = [f"user-{i}" for i in range(n)]
        for label, weights in (
            ("55/45 analysed as 50/50", (0.55, 0.45)),
            ("50/50 (correct)", (0.5, 0.5)),
        ):
            arms = [("a", weights[0]), ("b", weights[1])]
            counts = np.stack(
                [
                    np.bincount(assign_arms(f"srm-{seed}-{n}-{s}", ids, arms), minlength=2)
                    for s in range(simulations)
                ]
            ).astype(np.float64)
            expected = np.full_like(counts, n / 2)
            _, p = srm_chisquare(counts, expected)
            rows.append(
                {"users": n, "split": label, "alarm": rate(int((p < threshold).sum()), simulations)}
            )
    return rows


def cuped_study(base: ReplayBase) -> list[dict]:
    """Variance reduction of each metric with its pre-period covariate (all users)."""
    rows = []
    group = np.zeros(len(base.users), np.int64)
    for m in METRICS:
        y = base.users.values[m]
        _, info = cuped_adjust(y, base.users.pre[m], group)
        rows.append(
            {
                "metric": m,
                "users": len(y),
                "with_covariate": info["n_with_covariate"],
                "corr": info["corr"],
                "theta": info["theta"],
                "variance_reduction": info["variance_reduction"],
                "equivalent_extra_users": 1.0 / (1.0 - info["variance_reduction"]) - 1.0,
            }
        )
    return rows


def check_simulations(n: int) -> int:
    if not 10 <= n <= 100_000:
        raise ValidationError(f"--simulations must be in [10, 100000], got {n}")
    return n
