"""Sequential test valid under continuous monitoring: the mixture SPRT (mSPRT).

Reference: Johari, Koomen, Pekelis, Walsh (2017/2022), "Peeking at A/B tests: why it
matters, and what to do about it" (KDD 2017) / "Always valid inference" (Operations
Research 2022). With the difference-in-means estimate ``d_n`` after the n-th look, its
variance ``V_n = v_t/n_t + v_c/n_c`` and a normal mixture ``theta ~ N(0, tau^2)`` over the
true difference under H1, the mixture likelihood ratio against H0: theta = 0 is

    Lambda_n = sqrt(V_n / (V_n + tau^2)) * exp( tau^2 d_n^2 / (2 V_n (V_n + tau^2)) )

Under H0, Lambda_n is a (asymptotically, with estimated variances) non-negative
martingale with mean 1, so by Ville's inequality P(sup_n Lambda_n >= 1/alpha) <= alpha:
rejecting the first time ``Lambda_n >= 1/alpha`` keeps the type-I error at alpha however
often one looks. The always-valid p-value is ``p_n = min(1, min_{m<=n} 1/Lambda_m)``.
Inverting the test gives the confidence sequence (valid at every look simultaneously)

    d_n +- sqrt( V_n (V_n + tau^2) / tau^2 * (2 log(1/alpha) + log((V_n + tau^2) / V_n)) )

(intersected over looks so it only narrows). ``tau`` sets where the test is most
powerful: effects of about tau are detected fastest. We use ``tau = tau_scale * s`` with s
the pooled per-user standard deviation (a prior on effects of a few tenths of an sd).

All functions are vectorised: the inputs are arrays [..., L] over L looks (e.g. days) with
any leading batch shape (e.g. S simulations).

Example::

    r = msprt(d=np.array([0.0, 0.02, 0.05]), var=np.array([4e-4, 2e-4, 1e-4]), tau=0.05)
    r["reject"]    # array([False, False, True]) once Lambda >= 20
"""

from __future__ import annotations

import numpy as np

from recsys.errors import ValidationError


def msprt(d: np.ndarray, var: np.ndarray, tau: float | np.ndarray, alpha: float = 0.05) -> dict:
    """mSPRT over looks.

    Args:
        d: [..., L] difference-in-means estimate at each look.
        var: [..., L] its variance V (NaN/inf where a look has too few users).
        tau: mixture sd (scalar or broadcastable to [..., 1]).
        alpha: type-I error over all looks.

    Returns:
        dict of arrays [..., L]: ``log_lr`` (log Lambda), ``p_value`` (always-valid,
        running minimum), ``reject`` (running: True from the first crossing on),
        ``cs_low`` / ``cs_high`` (the running-intersection confidence sequence), and
        ``threshold`` = log(1/alpha).
    """
    d = np.asarray(d, np.float64)
    var = np.asarray(var, np.float64)
    if d.shape != var.shape:
        raise ValidationError(f"d and var must have one shape, got {d.shape} and {var.shape}")
    tau2 = np.asarray(tau, np.float64) ** 2
    if np.any(tau2 <= 0):
        raise ValidationError("tau must be > 0")
    ok = np.isfinite(var) & (var > 0) & np.isfinite(d)
    v = np.where(ok, var, 1.0)
    log_lr = 0.5 * np.log(v / (v + tau2)) + tau2 * d**2 / (2.0 * v * (v + tau2))
    log_lr = np.where(ok, log_lr, -np.inf)
    p_value = np.minimum.accumulate(np.minimum(1.0, np.exp(-log_lr)), axis=-1)
    threshold = np.log(1.0 / alpha)
    reject = np.maximum.accumulate(log_lr >= threshold, axis=-1)
    half = np.sqrt(v * (v + tau2) / tau2 * (2.0 * threshold + np.log((v + tau2) / v)))
    low = np.maximum.accumulate(np.where(ok, d - half, -np.inf), axis=-1)
    high = np.minimum.accumulate(np.where(ok, d + half, np.inf), axis=-1)
    return {
        "log_lr": log_lr,
        "p_value": p_value,
        "reject": reject,
        "cs_low": low,
        "cs_high": high,
        "threshold": threshold,
    }
