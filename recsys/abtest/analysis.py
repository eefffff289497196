"""Analyse an experiment: every arm against the control, for every metric.

For each metric and treatment arm (vs the control arm):

* Welch difference and relative difference with a (1 - alpha) CI (:mod:`.stats`);
* user-level BCa bootstrap CIs of both (:func:`.stats.bootstrap_diff`);
* CUPED with the pre-period covariate, its variance reduction, and the adjusted Welch CI;
* the decision test is the CUPED-adjusted Welch test when a covariate exists (else the
  plain one); its p-values are Holm-corrected across the treatment arms (per metric,
  :func:`statsmodels.stats.multitest.multipletests`);
* power: MDE at the target power from the observed (adjusted) variance (:mod:`.power`);
* the mSPRT over the days (:mod:`.sequential`), valid although one looks every day.

Plus the sample-ratio-mismatch check over all arms (:mod:`.srm`), and a verdict per metric
and per arm: ``SRM - don't trust`` overrides everything; a primary metric significantly
better is ``ship`` (unless a guardrail is harmful), worse is ``harmful``; a guardrail
significantly worse is ``harmful guardrail``; otherwise ``no detectable effect``.

Example::

    report = analyze(exp, users, daily)
    report["comparisons"]["ndcg@10"]["system-20"]["verdict"]
"""

from __future__ import annotations

import math

import numpy as np
from statsmodels.stats.multitest import multipletests

from recsys.abtest.experiment import Experiment
from recsys.abtest.metrics import METRICS
from recsys.abtest.power import mde, power_of
from recsys.abtest.sequential import msprt
from recsys.abtest.srm import srm_check
from recsys.abtest.stats import bootstrap_diff, cuped_adjust, welch
from recsys.abtest.usertable import DailyTable, UserTable
from recsys.errors import ValidationError

REFERENCE_LIFT = 0.05  # power is also reported for a +5 % relative change
MIN_USERS_PER_ARM = 2


def arm_moments(
    values: np.ndarray, active: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-arm n, mean and unbiased variance for many looks and many assignments at once.

    Args:
        values: [L, U] per-user value at each look (anything where ``active`` is False).
        active: [L, U] bool, the user counts at that look.
        masks: [S, U] bool, membership of the arm under S assignments.

    Returns:
        (n, mean, var), each [S, L] (mean/var NaN where n < 2).
    """
    a = active.astype(np.float64)
    v = np.where(active, values, 0.0)
    m = masks.astype(np.float64).T  # [U, S]
    n = (a @ m).T  # [S, L]
    s1 = (v @ m).T
    s2 = ((v * v) @ m).T
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = (s2 - n * mean**2) / (n - 1)
    ok = n >= 2
    return n, np.where(ok, mean, np.nan), np.where(ok, np.maximum(var, 0.0), np.nan)


def daily_values(daily: DailyTable, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Each user's running mean of ``metric`` at the end of each day: (values [D, U],
    active [D, U] = the user has had an event by then)."""
    active = daily.counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(active, daily.sums[metric] / np.maximum(daily.counts, 1.0), 0.0)
    return values, active


def _clean(x):
    """NaN/inf -> None, numpy scalars -> Python (for JSON)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, np.bool_ | bool):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    return x


def analyze(exp: Experiment, users: UserTable, daily: DailyTable | None = None) -> dict:
    """The full analysis as a JSON-able dict (see the module docstring)."""
    cfg = exp.analysis
    names = [a.name for a in exp.arms]
    missing = [m for m in exp.metrics if m not in users.values]
    if missing:
        raise ValidationError(
            f"the per-user data has no column for metric(s) {missing} named by experiment "
            f"{exp.name!r}; it has {users.metrics}"
        )
    counts = {a: int((users.arm == a).sum()) for a in names}
    srm = srm_check(
        {a: int((users.arm == a).sum()) for a in np.unique(users.arm)}, dict(exp.arm_pairs)
    )
    too_small = [a for a in names if counts[a] < MIN_USERS_PER_ARM and exp.arm(a).weight > 0]
    if too_small:
        raise ValidationError(
            f"arm(s) {too_small} have fewer than {MIN_USERS_PER_ARM} users; "
            "run the experiment on more users"
        )
    group = np.unique(users.arm, return_inverse=True)[1]  # [U] arm code (for CUPED's theta)
    arms = {
        a: {
            "n": counts[a],
            "weight": exp.arm(a).weight,
            "policy": exp.arm(a).policy,
            "means": {m: float(np.mean(users.values[m][users.arm == a])) for m in exp.metrics},
        }
        for a in names
    }
    comparisons: dict[str, dict] = {}
    cuped_info: dict[str, dict] = {}
    for metric in exp.metrics:
        y = users.values[metric]
        y_adj, info = cuped_adjust(y, users.pre[metric], group)
        use_cuped = info["variance_reduction"] > 0
        info["used"] = use_cuped
        cuped_info[metric] = info
        per_arm = {}
        for arm in exp.treatments:
            t, c = users.arm == arm.name, users.arm == exp.control
            raw = welch(y[t], y[c], cfg.alpha)
            adj = welch(y_adj[t], y_adj[c], cfg.alpha) if use_cuped else None
            decision = adj if adj is not None else raw
            pooled_sd = math.sqrt((np.var(y_adj[t], ddof=1) + np.var(y_adj[c], ddof=1)) / 2)
            pw = _power(decision, pooled_sd, raw["mean_c"], cfg.alpha, cfg.power)
            per_arm[arm.name] = {
                "welch": raw,
                "bootstrap": bootstrap_diff(
                    y[t], y[c], alpha=cfg.alpha, resamples=cfg.bootstrap, seed=cfg.seed
                ),
                "cuped": adj,
                "decision_test": "cuped" if adj is not None else "welch",
                "power": pw,
                "sequential": (
                    _sequential(exp, users, daily, metric, arm.name) if daily is not None else None
                ),
            }
        # a metric constant in both arms has no p-value (NaN): no evidence, p = 1
        pvals = np.nan_to_num(
            [r["cuped" if r["cuped"] else "welch"]["p_value"] for r in per_arm.values()], nan=1.0
        )
        reject, p_holm, _, _ = multipletests(pvals, alpha=cfg.alpha, method="holm")
        for res, rj, ph in zip(per_arm.values(), reject, p_holm, strict=True):
            res["p_holm"] = float(ph)
            res["significant"] = bool(rj)
            res["verdict"] = _metric_verdict(exp, metric, res, srm["flag"])
        comparisons[metric] = per_arm
    verdicts = {a.name: _arm_verdict(exp, comparisons, a.name, srm["flag"]) for a in exp.treatments}
    return _clean(
        {
            "experiment": exp.to_dict(),
            "users": len(users),
            "arms": arms,
            "srm": srm,
            "cuped": cuped_info,
            "comparisons": comparisons,
            "verdicts": verdicts,
            "days": len(daily.days) if daily is not None else 0,
        }
    )


def _power(decision: dict, sd: float, mean_c: float, alpha: float, power: float) -> dict:
    if not sd > 0:
        return {"sd": sd, "mde": None, "mde_rel": None, "power_at_ref_lift": None}
    n_c, n_t = decision["n_c"], decision["n_t"]
    m = mde(n_c=n_c, n_t=n_t, sd=sd, alpha=alpha, power=power)
    ref = REFERENCE_LIFT * abs(mean_c)
    return {
        "sd": sd,
        "alpha": alpha,
        "target_power": power,
        "mde": m,
        "mde_rel": m / abs(mean_c) if mean_c else None,
        "reference_lift": REFERENCE_LIFT,
        "power_at_ref_lift": power_of(ref, n_c=n_c, n_t=n_t, sd=sd, alpha=alpha) if ref else None,
    }


def _sequential(
    exp: Experiment, users: UserTable, daily: DailyTable, metric: str, arm: str
) -> dict:
    """mSPRT of arm vs control over the days. tau = tau_scale * sd, sd from the pre-period
    covariate when there is one (fixed before the experiment), else from the first look
    (so that no look's test uses data from later looks).
    A day is a look once both arms have ``sequential_min_users`` users."""
    values, active = daily_values(daily, metric)
    masks = np.stack([users.arm == arm, users.arm == exp.control])  # [2, U]
    n, mean, var = arm_moments(values, active, masks)  # [2, D]
    pre = users.pre[metric]
    pre_ok = np.isfinite(pre)
    sd_source = "pre-period"
    sd = float(np.std(pre[pre_ok], ddof=1)) if pre_ok.sum() > 2 else 0.0
    if not sd > 0:  # no pre-period: the first look's sd (never data from later looks)
        sd_source = "first look"
        ok = np.flatnonzero(
            (np.minimum(n[0], n[1]) >= exp.analysis.sequential_min_users)
            & np.isfinite(var).all(axis=0)
        )
        sd = float(np.sqrt(np.mean(var[:, ok[0]]))) if len(ok) else 0.0
    if not sd > 0:
        return {"tau": None, "note": f"{metric} has no variance; no sequential test"}
    tau = exp.analysis.tau_scale * sd
    d = mean[0] - mean[1]
    v = var[0] / n[0] + var[1] / n[1]
    # looks before both arms have sequential_min_users users do not count (NaN = no look)
    v = np.where(np.minimum(n[0], n[1]) >= exp.analysis.sequential_min_users, v, np.nan)
    res = msprt(d, v, tau, exp.analysis.alpha)
    crossed = np.flatnonzero(res["reject"])
    return {
        "tau": tau,
        "tau_sd_source": sd_source,
        "min_users": exp.analysis.sequential_min_users,
        "looks": int(np.isfinite(v).sum()),
        "days": daily.days.tolist(),
        "n_t": n[0].tolist(),
        "n_c": n[1].tolist(),
        "diff": d.tolist(),
        "cs_low": res["cs_low"].tolist(),
        "cs_high": res["cs_high"].tolist(),
        "log_lr": res["log_lr"].tolist(),
        "threshold": float(res["threshold"]),
        "p_value": float(res["p_value"][-1]),
        "reject": bool(res["reject"][-1]),
        "first_reject_day": int(daily.days[crossed[0]]) if crossed.size else None,
    }


def _metric_verdict(exp: Experiment, metric: str, res: dict, srm_flag: bool) -> str:
    if srm_flag:
        return "SRM - don't trust"
    test = res["cuped"] or res["welch"]
    better = (test["diff"] > 0) == METRICS[metric].higher_is_better
    if metric in exp.secondary_metrics:
        if not res["significant"]:
            return "no detectable effect"
        return "higher" if test["diff"] > 0 else "lower"
    if not res["significant"]:
        return "no detectable effect"
    if metric == exp.primary_metric:
        return "ship" if better else "harmful"
    return "improved" if better else "harmful guardrail"


def _arm_verdict(exp: Experiment, comparisons: dict, arm: str, srm_flag: bool) -> str:
    if srm_flag:
        return "SRM - don't trust"
    harmful = [
        m for m in exp.guardrail_metrics if comparisons[m][arm]["verdict"] == "harmful guardrail"
    ]
    primary = comparisons[exp.primary_metric][arm]["verdict"]
    if harmful:
        return f"don't ship: harmful guardrail ({', '.join(harmful)})"
    if primary == "ship":
        return "ship"
    if primary == "harmful":
        return f"don't ship: {exp.primary_metric} worse"
    return "no detectable effect"
