"""Deterministic user -> arm assignment by hashing (salt, user).

The unit draw of a user is ``u = int(sha256(salt + "\\x1f" + user_id)[:8]) / 2**64``, a
number in ``[0, 1)`` that depends only on the salt and the user id: the same in every run,
process and machine (no ``hash()`` randomisation, no RNG state). The user goes to the first
arm whose cumulative weight exceeds ``u``. Changing the salt re-randomises everybody;
adding an arm at the end with weight taken from the last arm moves only users of that arm.

Pure standard library + numpy: the device service imports this module, so it must not pull
in ``codebook`` or ``device_ranker``.

Example::

    assign_arm("exp-1", "42", [("control", 0.5), ("treatment", 0.5)])   # 'control' or ...
    unit_draws("exp-1", ["1", "2", "3"])                                  # array [3] in [0, 1)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from recsys.errors import ValidationError

# Weights must sum to 1 within this tolerance (same as recsys.abtest.experiment).
WEIGHT_TOLERANCE = 1e-9
_SEPARATOR = "\x1f"  # ASCII unit separator: ("ab", "c") and ("a", "bc") hash differently
_SCALE = float(2**64)


def unit_draw(salt: str, user_id: str) -> float:
    """The user's uniform draw in ``[0, 1)`` for this salt (first 64 bits of SHA-256)."""
    digest = hashlib.sha256(f"{salt}{_SEPARATOR}{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def unit_draws(salt: str, user_ids: Iterable[str]) -> np.ndarray:
    """Unit draws of many users, float64 array [U] (same values as :func:`unit_draw`)."""
    prefix = f"{salt}{_SEPARATOR}".encode()
    raw = b"".join(hashlib.sha256(prefix + str(u).encode()).digest()[:8] for u in user_ids)
    return np.frombuffer(raw, dtype=">u8").astype(np.float64) / _SCALE


def check_weights(arms: Sequence[tuple[str, float]]) -> np.ndarray:
    """Validate ``(name, weight)`` pairs; returns the cumulative weights, float64 [A]."""
    if not arms:
        raise ValidationError("an experiment needs at least one arm; none given")
    names = [name for name, _ in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValidationError(f"duplicate arm name(s) {dupes}; give every arm its own name")
    weights = np.array([float(w) for _, w in arms], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValidationError(f"arm weights must be finite and >= 0, got {weights.tolist()}")
    total = float(weights.sum())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ValidationError(
            f"arm weights sum to {total!r}, not 1 (within {WEIGHT_TOLERANCE:g}); "
            "rescale them so that they add up to exactly 1"
        )
    return np.cumsum(weights)


def arm_index(draws: np.ndarray, cumulative: np.ndarray) -> np.ndarray:
    """Arm index of each draw: the first arm whose cumulative weight exceeds it, int64 [U].

    ``draws`` [U] in [0, 1), ``cumulative`` [A] from :func:`check_weights`. Rounding in the
    cumulative sum (last entry 1 - 1e-16) can never send a draw past the last arm.
    """
    idx = np.searchsorted(cumulative, draws, side="right")
    return np.minimum(idx, len(cumulative) - 1).astype(np.int64)


def assign_arm(salt: str, user_id: str, arms: Sequence[tuple[str, float]]) -> str:
    """The arm name of ``user_id`` under ``salt`` and the ``(name, weight)`` split."""
    if not isinstance(user_id, str) or not user_id:
        raise ValidationError(f"user id must be a non-empty string, got {user_id!r}")
    cumulative = check_weights(arms)
    idx = arm_index(np.array([unit_draw(salt, user_id)]), cumulative)
    return arms[int(idx[0])][0]


def assign_arms(
    salt: str, user_ids: Sequence[str], arms: Sequence[tuple[str, float]]
) -> np.ndarray:
    """Arm index of every user, int64 [U] (vectorised :func:`assign_arm`)."""
    cumulative = check_weights(arms)
    return arm_index(unit_draws(salt, user_ids), cumulative)
