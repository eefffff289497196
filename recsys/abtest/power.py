"""Power and minimum detectable effect (MDE) of a two-arm comparison of means.

Uses :class:`statsmodels.stats.power.TTestIndPower` (two-sided two-sample t test) on the
standardised effect ``d = delta / s`` with s the pooled per-user standard deviation:

* power of an absolute effect ``delta`` with n_c control and n_t treatment users:
  ``TTestIndPower().power(d, nobs1=n_c, alpha, ratio=n_t / n_c)``;
* MDE: the delta whose power is the target power, ``solve_power(effect_size=None, ...) * s``;
* users needed per arm for a relative lift (sample-size planning).

Example::

    mde(n_c=300, n_t=300, sd=0.2, alpha=0.05, power=0.8)   # ~0.0458 = 0.229 sd
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.power import TTestIndPower

from recsys.errors import ValidationError


def _check(n_c: float, n_t: float, sd: float) -> None:
    if n_c < 2 or n_t < 2:
        raise ValidationError(f"power needs >= 2 users per arm, got n_c={n_c}, n_t={n_t}")
    if not np.isfinite(sd) or sd <= 0:
        raise ValidationError(f"power needs a positive standard deviation, got {sd}")


def power_of(delta: float, *, n_c: float, n_t: float, sd: float, alpha: float = 0.05) -> float:
    """Probability that the two-sided Welch/t test at ``alpha`` detects an effect ``delta``."""
    _check(n_c, n_t, sd)
    return float(TTestIndPower().power(abs(delta) / sd, nobs1=n_c, alpha=alpha, ratio=n_t / n_c))


def mde(*, n_c: float, n_t: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest absolute effect detected with probability ``power`` (two-sided)."""
    _check(n_c, n_t, sd)
    d = TTestIndPower().solve_power(
        effect_size=None, nobs1=n_c, alpha=alpha, power=power, ratio=n_t / n_c
    )
    return float(d) * sd


def users_needed(
    delta: float, *, sd: float, ratio: float = 1.0, alpha: float = 0.05, power: float = 0.8
) -> float:
    """Control users needed to detect ``delta`` (treatment users = ratio * that)."""
    if delta == 0:
        raise ValidationError("users_needed: the effect must be non-zero")
    _check(2, 2, sd)
    return float(
        TTestIndPower().solve_power(
            effect_size=abs(delta) / sd, nobs1=None, alpha=alpha, power=power, ratio=ratio
        )
    )
