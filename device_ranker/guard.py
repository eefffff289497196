"""The harm guard: a new edit replaces the current head only if this user's edits help.

Before a new edit is applied, the device checks its evidence that edits help THIS user
and otherwise serves the base head (the edit is kept as the candidate, not applied).
The evidence is the user's last ``window`` clicks, each scored by the base head and by
the **candidate edit the device held when the click happened** (the served edit, or the
rejected one scored in shadow): an edit is only ever judged on clicks that came AFTER
it was made, which it cannot have read. The new edit itself cannot be judged without
bias: every click the device has seen was in its input window (the uplink), so checking
it on them measures how well it echoes its input, not how well it predicts. The guard
therefore judges the user's previous edits (same generator, same user, a few events
older) as the proxy for the new one.

    gain(rank)  = 1 / log2(1 + rank)                  (DCG of one click, no cut-off)
    d_i         = gain(rank_edit) - gain(rank_base)   over the last n <= m clicks
    accept      = mean(d) + z * sd(d) / sqrt(n) >= -margin   or   n < min_evidence

With ``z = 0`` an edit is kept out whenever the user's edits did worse than the base head
on average, however noisy the evidence (on ml-100k that kept out 31 % of the edits and
lost 17 % of the gain); the default ``z = 1.645`` keeps it out only when the harm is
significant (a one-sided test at 5 %), the conventional level, not a tuned one.

The full-catalogue DCG is top-heavy like NDCG@10 but smoother (a click at rank 11
still counts), so ten clicks say more. Cost on the device: per click one base-head pass
and catalogue product beside the served one (the learned gate's base ranks share it)
and, while an edit is rejected, one more for the candidate; per edit a mean over at
most m floats (measured by the replay, ``guard_us``).

Shapes: m evidence clicks, R requests, E events.

Example::

    guard = HarmGuard(GuardConfig(window=20, margin=0.0))
    state = GuardState.empty(guard.config.window)
    state.record(base_rank=12, edit_rank=3)           # after each click with a candidate
    guard.accept(state)                               # True: apply the new edit
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from recsys.errors import ValidationError
from recsys.serving.fleet_guard import benefit_test, harm_test
from recsys.validation import config_dataclass

__all__ = [
    "GuardConfig",
    "GuardState",
    "HarmGuard",
    "benefit_test",
    "check_evidence",
    "click_gain",
    "harm_test",
]


@config_dataclass
class GuardConfig:
    """Harm-guard settings (fixed a priori, not tuned on any replay).

    Attributes:
        window: m, the user's most recent clicks the evidence averages.
        margin: how much worse than the base head (mean DCG per click) the user's edits
            may be and still be applied.
        min_evidence: with fewer scored clicks, accept (no evidence yet: the edit's
            training says edits help on average).
        z: keep an edit out only if the evidence is below ``-margin`` by ``z`` standard
            errors (1.645: a one-sided test at 5 %; 0: on the mean alone).
    """

    window: int = Field(20, ge=1)
    margin: float = Field(0.0, ge=0.0)
    min_evidence: int = Field(3, ge=0)
    z: float = Field(1.645, ge=0.0)


def click_gain(ranks: np.ndarray) -> np.ndarray:
    """``1 / log2(1 + rank)`` of 1-based ranks (any shape)."""
    return 1.0 / np.log2(1.0 + np.asarray(ranks, dtype=np.float64))


@dataclass
class GuardState:
    """One device's evidence: gain(edit) - gain(base) of its last ``window`` clicks."""

    diffs: deque[float]

    @classmethod
    def empty(cls, window: int) -> GuardState:
        return cls(deque(maxlen=window))

    def record(self, base_rank: int, edit_rank: int) -> None:
        """A click, with its rank under the base head and under the candidate edit."""
        self.diffs.append(float(click_gain(edit_rank) - click_gain(base_rank)))


def check_evidence(
    diffs: Sequence[float], clicks: float, total: float, squares: float, window: int
) -> None:
    """ValidationError unless the evidence could have come from :meth:`GuardState.record`
    (what a stored state must satisfy before it is used again).

    ``diffs`` [<= m]: the last clicks' gain differences (each in [-1, 1], a gain is in
    (0, 1]); ``clicks`` / ``total`` / ``squares``: the cumulative count (a whole number),
    sum and sum of squares over every scored click. The window is the most recent part
    of the clicks, so ``len(diffs) <= min(clicks, window)``, its squares are part of
    ``squares``, and the clicks before it account for ``total - sum(diffs)``; over all
    clicks ``|total| <= clicks``, ``squares <= clicks`` and ``total^2 <= clicks * squares``
    (Cauchy-Schwarz). Tolerances allow float sums.
    """
    values = [float(d) for d in diffs]
    if not all(math.isfinite(v) for v in (clicks, total, squares, *values)):
        raise ValidationError("the guard evidence has a NaN or infinite value")
    if window < 1:
        raise ValidationError(f"the guard window must be >= 1, got {window}")
    if clicks < 0 or clicks != round(clicks):
        raise ValidationError(f"the guard click count must be a whole number >= 0, got {clicks}")
    if len(values) > min(clicks, window):
        raise ValidationError(
            f"{len(values)} gain differences in the window, more than its {window} slots or "
            f"the {clicks:g} clicks scored"
        )
    if any(abs(v) > 1.0 for v in values):
        raise ValidationError("a gain difference outside [-1, 1]")
    tol = 1e-9 * max(clicks, 1.0)
    w_sum, w_sq = math.fsum(values), math.fsum(v * v for v in values)
    older = clicks - len(values)
    if (
        squares < -tol
        or squares > clicks + tol
        or abs(total) > clicks + tol
        or total * total > clicks * squares + tol * (1.0 + clicks)
        or w_sq > squares + tol
        or abs(total - w_sum) > older + tol
        or squares - w_sq > older + tol
    ):
        raise ValidationError(
            f"the guard evidence is inconsistent (clicks {clicks:g}, sum {total:g}, sum of "
            f"squares {squares:g}, window {len(values)} values summing to {w_sum:g})"
        )


class HarmGuard:
    """Accepts or rejects new edits (see the module docstring)."""

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()

    def accept(self, state: GuardState) -> bool:
        """The device's check when an edit arrives."""
        n = len(state.diffs)
        if n < max(self.config.min_evidence, 1):
            return True
        # plain Python over <= m floats: a few µs, no array allocation
        total = math.fsum(state.diffs)
        squares = math.fsum(x * x for x in state.diffs)
        cfg = self.config
        mean = total / n
        var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
        return mean + cfg.z * math.sqrt(var / n) >= -cfg.margin - 1e-12

    def accept_many(self, diffs: np.ndarray, scored: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The same decisions for R edits of one device at once (the replay).

        Args:
            diffs: [E] gain(edit) - gain(base) of the device's clicks in time order.
            scored: [E] bool, the click had a candidate edit (made before it).
            ends: [R] for each new edit, how many of the E clicks came before it.

        Returns:
            [R] bool, True = apply.
        """
        cfg = self.config
        d = np.where(scored, diffs, 0.0)
        cs = np.concatenate([[0.0], np.cumsum(d)])  # [E + 1]
        cq = np.concatenate([[0.0], np.cumsum(d * d)])  # [E + 1]
        cn = np.concatenate([[0], np.cumsum(scored)])  # [E + 1]
        ends = np.asarray(ends, dtype=np.int64)
        # the last `window` SCORED clicks before each edit: walk back from `ends` until
        # `window` scored clicks are in (scored clicks are a suffix-closed run here, but
        # the search does not assume it)
        want = np.maximum(cn[ends] - cfg.window, 0)  # scored clicks to skip
        starts = np.searchsorted(cn, want, side="left")  # first index with cn == want
        n = cn[ends] - cn[starts]
        return harm_test(cs[ends] - cs[starts], cq[ends] - cq[starts], n, cfg)
