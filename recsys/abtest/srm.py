"""Sample-ratio-mismatch (SRM) check: do the arms' user counts match the configured split?

Pearson's chi-square goodness of fit (:func:`scipy.stats.chisquare`) of the observed
counts n_a against the expected ``N * w_a`` with A - 1 degrees of freedom. A mismatch
(p < 0.001, the usual threshold of GrowthBook / Statsig / Optimizely) means users were lost
or duplicated in a way that depends on the arm, so every other number of the experiment
is suspect.

Example::

    srm_check({"a": 5500, "b": 4500}, {"a": 0.5, "b": 0.5})["flag"]   # True (p ~ 1e-23)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats as sps

from recsys.errors import ValidationError

SRM_P_THRESHOLD = 1e-3


def srm_check(
    counts: Mapping[str, int],
    weights: Mapping[str, float],
    threshold: float = SRM_P_THRESHOLD,
) -> dict:
    """Chi-square SRM test; returns counts, expected, chi2, p_value and flag (p < threshold)."""
    arms = list(weights)
    unknown = sorted(set(counts) - set(arms))
    if unknown:
        raise ValidationError(
            f"users were found in arm(s) {unknown} that the experiment does not define "
            f"(arms: {arms}); check that the data belongs to this experiment"
        )
    obs = np.array([int(counts.get(a, 0)) for a in arms], dtype=np.float64)
    w = np.array([float(weights[a]) for a in arms], dtype=np.float64)
    total = obs.sum()
    if total <= 0:
        raise ValidationError("no users in any arm; nothing to check")
    live = w > 0  # a zero-weight arm must stay empty; it does not enter the chi-square
    if np.any(obs[~live] > 0):
        raise ValidationError("users in an arm with weight 0: the assignment is broken")
    expected = total * w / w.sum()
    chi2, p = srm_chisquare(obs[None, live], expected[None, live])
    return {
        "counts": {a: int(c) for a, c in zip(arms, obs, strict=True)},
        "expected": {a: float(e) for a, e in zip(arms, expected, strict=True)},
        "chi2": float(chi2[0]),
        "p_value": float(p[0]),
        "threshold": threshold,
        "flag": bool(p[0] < threshold),
    }


def srm_chisquare(observed: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised chi-square over a batch: observed, expected [S, A] -> (chi2 [S], p [S])."""
    res = sps.chisquare(observed, expected, axis=-1)
    return np.atleast_1d(res.statistic), np.atleast_1d(res.pvalue)
