"""User-level bootstrap confidence intervals for event-averaged metrics.

One user's events are correlated, so a CI of an event average resamples USERS: each
user contributes the sum of their events' values and their event count, and the
statistic of a resample is ``sum(sums) / sum(counts)`` (a ratio estimator, paired per
user). The percentile interval comes from ``scipy.stats.bootstrap`` (vectorised).

Shapes: E events, U users.

Example::

    lo, hi = user_bootstrap_ci(ndcg_system - ndcg_static, users, seed=0)   # diff [E], users [E]
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def user_bootstrap_ci(
    values: np.ndarray,
    users: np.ndarray,
    seed: int,
    resamples: int = 2000,
    confidence: float = 0.95,
) -> list[float]:
    """Percentile CI of the event-averaged ``values`` [E], resampling users [E].

    Returns ``[low, high]``; ``[nan, nan]`` with fewer than two users, ``[0, 0]`` when
    every user's sum is zero (e.g. two identical policies), where the bootstrap is
    degenerate. Seeded: the same inputs and seed give the same interval.
    """
    uniq, inv = np.unique(users, return_inverse=True)
    if len(uniq) < 2:
        return [float("nan"), float("nan")]
    sums = np.bincount(inv, weights=values, minlength=len(uniq))  # [U]
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)  # [U]
    if np.allclose(sums, 0.0):
        return [0.0, 0.0]

    def ratio(s: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        return s.sum(axis=axis) / c.sum(axis=axis)

    res = stats.bootstrap(
        (sums, counts),
        ratio,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng([seed, 7]),
    )
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]
