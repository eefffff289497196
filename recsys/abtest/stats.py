"""Fixed-horizon comparisons of two arms: Welch t, user-level bootstrap, CUPED.

Every function works on per-user values (one number per user, users independent).
:func:`welch_from_moments` is vectorised over any batch shape S (used by the validation
studies, e.g. S = 1000 re-randomisations), the others take the raw samples.

Welch (unequal variances), treatment t vs control c::

    diff = m_t - m_c,   se^2 = v_t / n_t + v_c / n_c
    df   = se^4 / ((v_t/n_t)^2 / (n_t - 1) + (v_c/n_c)^2 / (n_c - 1))   (Welch-Satterthwaite)
    CI   = diff +- t_{df, 1 - alpha/2} * se,   p = 2 * P(T_df > |diff / se|)

Relative difference ``diff / m_c`` with a delta-method standard error
``sqrt(v_t/(n_t m_c^2) + m_t^2 v_c/(n_c m_c^4))`` (the ratio of two independent means).

CUPED (Deng, Xu, Kohavi, Walker 2013, "Improving the sensitivity of online controlled
experiments by utilizing pre-experiment data"): with a pre-period covariate x unaffected
by the treatment, ``y_adj = y - theta (x - mean(x))`` with ``theta = cov(y, x) / var(x)``
keeps every arm's mean unbiased and shrinks the variance by ``rho^2`` (rho = corr(y, x)).
theta is estimated from within-arm centred values (pooled over arms), so a treatment effect
does not leak into it. Users without a covariate keep ``y`` (their x is imputed by the
mean, which is independent of the arm).

Example::

    r = welch(np.array([1.0, 2, 3, 4]), np.array([0.0, 1, 2, 2]))
    r["diff"], r["ci_low"], r["p_value"]
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

from recsys.errors import ValidationError


def _check_sample(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValidationError(f"{what}: need a 1-D sample of >= 2 users, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValidationError(f"{what}: contains NaN or infinite values")
    return x


def welch_from_moments(
    n_t: np.ndarray,
    mean_t: np.ndarray,
    var_t: np.ndarray,
    n_c: np.ndarray,
    mean_c: np.ndarray,
    var_c: np.ndarray,
    alpha: float = 0.05,
) -> dict[str, np.ndarray]:
    """Welch test and CI from per-arm moments, all arrays broadcast to a batch shape [S].

    ``var_*`` are unbiased sample variances (ddof=1). Returns arrays [S]: diff, se, df,
    t, p_value, ci_low, ci_high, rel, rel_se, rel_ci_low, rel_ci_high.
    """
    n_t, n_c = np.asarray(n_t, np.float64), np.asarray(n_c, np.float64)
    a, b = np.asarray(var_t, np.float64) / n_t, np.asarray(var_c, np.float64) / n_c
    diff = np.asarray(mean_t, np.float64) - np.asarray(mean_c, np.float64)
    se = np.sqrt(a + b)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (a + b) ** 2 / (a**2 / (n_t - 1) + b**2 / (n_c - 1))
        t = diff / se
        p = 2.0 * sps.t.sf(np.abs(t), df)
        q = sps.t.ppf(1.0 - alpha / 2.0, df)
        mc = np.asarray(mean_c, np.float64)
        rel = diff / mc
        rel_se = np.sqrt(a / mc**2 + np.asarray(mean_t, np.float64) ** 2 * b / mc**4)
        z = sps.norm.ppf(1.0 - alpha / 2.0)
    return {
        "diff": diff,
        "se": se,
        "df": df,
        "t": t,
        "p_value": p,
        "ci_low": diff - q * se,
        "ci_high": diff + q * se,
        "rel": rel,
        "rel_se": rel_se,
        "rel_ci_low": rel - z * rel_se,
        "rel_ci_high": rel + z * rel_se,
    }


def welch(x_t: np.ndarray, x_c: np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """Welch comparison of treatment sample ``x_t`` [N_t] vs control ``x_c`` [N_c]."""
    x_t, x_c = _check_sample(x_t, "treatment"), _check_sample(x_c, "control")
    out = welch_from_moments(
        x_t.size, x_t.mean(), x_t.var(ddof=1), x_c.size, x_c.mean(), x_c.var(ddof=1), alpha
    )
    res = {k: float(v) for k, v in out.items()}
    res.update(
        n_t=int(x_t.size), n_c=int(x_c.size), mean_t=float(x_t.mean()), mean_c=float(x_c.mean())
    )
    return res


def bootstrap_diff(
    x_t: np.ndarray,
    x_c: np.ndarray,
    *,
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """User-level bootstrap CIs (BCa, :func:`scipy.stats.bootstrap`) of the absolute and
    relative difference of means; users are resampled within each arm independently."""
    x_t, x_c = _check_sample(x_t, "treatment"), _check_sample(x_c, "control")

    def diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return a.mean(axis=axis) - b.mean(axis=axis)

    def rel(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return a.mean(axis=axis) / b.mean(axis=axis) - 1.0

    out: dict[str, float] = {"resamples": resamples}
    if np.ptp(x_t) == 0 and np.ptp(x_c) == 0:  # every resample is the same: no spread
        d = float(x_t[0] - x_c[0])
        r = float(x_t[0] / x_c[0] - 1.0) if x_c[0] != 0 else float("nan")
        return out | {
            "ci_low": d,
            "ci_high": d,
            "se": 0.0,
            "rel_ci_low": r,
            "rel_ci_high": r,
            "rel_se": 0.0 if x_c[0] != 0 else float("nan"),
        }
    for name, fn in (("", diff), ("rel_", rel)):
        if name and x_c.mean() == 0:
            out.update(rel_ci_low=float("nan"), rel_ci_high=float("nan"))
            continue
        res = sps.bootstrap(
            (x_t, x_c),
            fn,
            n_resamples=resamples,
            confidence_level=1.0 - alpha,
            method="BCa",
            vectorized=True,
            paired=False,
            rng=np.random.default_rng(seed),
        )
        out[f"{name}ci_low"] = float(res.confidence_interval.low)
        out[f"{name}ci_high"] = float(res.confidence_interval.high)
        out[f"{name}se"] = float(res.standard_error)
    return out


def cuped_adjust(
    y: np.ndarray, x: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """CUPED-adjusted values [U] and the adjustment's figures.

    Args:
        y: [U] per-user metric in the experiment period.
        x: [U] pre-period covariate, NaN for users without one.
        groups: [U] int arm index (theta uses within-arm centred values).

    Returns:
        (y_adj [U], info) with info: theta, n_with_covariate, corr, variance_reduction
        (``1 - var_adj / var`` of the within-arm centred values; 0 when unusable).
    """
    y = np.asarray(y, np.float64)
    x = np.asarray(x, np.float64)
    groups = np.asarray(groups)
    if y.shape != x.shape or y.shape != groups.shape:
        raise ValidationError(f"y, x and groups must have one shape, got {y.shape}, {x.shape}")
    has = np.isfinite(x)
    info = {
        "theta": 0.0,
        "n_with_covariate": int(has.sum()),
        "corr": float("nan"),
        "variance_reduction": 0.0,
    }
    if has.sum() < 3:
        return y.copy(), info
    yc = y - _group_means(y, groups)  # within-arm centred
    xh = x[has]
    xc = xh - _group_means(xh, groups[has])
    var_x = float(np.mean(xc**2))
    if var_x <= 0:
        return y.copy(), info
    theta = float(np.mean(yc[has] * xc) / var_x)
    x_filled = np.where(has, x, xh.mean())
    y_adj = y - theta * (x_filled - xh.mean())
    ya = y_adj - _group_means(y_adj, groups)
    info.update(
        theta=theta,
        corr=float(np.corrcoef(yc[has], xc)[0, 1]),
        variance_reduction=float(1.0 - np.var(ya) / np.var(yc)) if np.var(yc) > 0 else 0.0,
    )
    return y_adj, info


def _group_means(v: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each element's group mean, [U]."""
    _, inv = np.unique(groups, return_inverse=True)
    means = np.bincount(inv, weights=v) / np.bincount(inv)
    return means[inv]
