"""Calibrating the request gate's threshold for a budget, ONCE, on the training period.

The gate (:class:`device_ranker.gate.ShiftGate`) asks for an edit when the shift score
between the device's recent window and the window at its last request reaches a
threshold. In replay the threshold is fixed per budget before the first replay event,
so a device's decisions depend only on its own events (users can be split across
processes and A/B arms); the realised request rate in replay is reported next to the
budget.

Calibration replays the gate over every training user's training-period sequence,
exactly as a device would (first request at ``min_history`` events, then a decision
after every event, ``min_gap`` events of cooldown), for all users at once (vectorised
over users, one step per history length), and bisects the threshold until the
fraction of decisions that request is the budget:

    rate(theta) = #requests after the first / #events after the first      (training period)

``rate`` falls as ``theta`` grows; 40 bisection steps pin theta to ~1e-12. A budget of
1 gives theta = 0 (every event requests, the same as a timer with period 1). The
bisection ignores the gate's per-device request credit (which caps each device at its
budget); the reported training rate is the one with the credit, as devices run it.

Shapes: U users, P training positions, D item-vector width.

Example::

    cal = calibrate_gate(item_table, train_sequences, [0.2, 0.1], window=10, min_history=5)
    cal[0.2].threshold, cal[0.2].train_rate          # ~0.2 on the training period
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from device_ranker.gate import GateConfig
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateCalibration:
    """The threshold chosen for one budget and the rate it gave on the training period."""

    budget: float
    threshold: float
    train_rate: float
    train_decisions: int
    window: int
    min_history: int
    min_gap: int
    max_credit: float = GateConfig.max_credit

    def gate_config(self) -> GateConfig:
        """The fixed-threshold :class:`GateConfig` a device (in-process or the gRPC
        device service) runs with to reproduce the replay's decisions."""
        return GateConfig(
            budget=self.budget,
            window=self.window,
            min_history=self.min_history,
            min_gap=self.min_gap,
            threshold=self.threshold,
            max_credit=self.max_credit,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class _Windows:
    """Unit window vectors of every (user, history length), flattened.

    ``vec[start[u] + L]`` is the normalised mean of the unit vectors of the last
    ``window`` items of ``seq_u[:L]`` (as :meth:`ShiftGate.window_summary`), L = 0..len.
    """

    def __init__(self, vectors: np.ndarray, sequences: Sequence[np.ndarray], window: int):
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        self.lengths = np.array([len(s) for s in sequences], dtype=np.int64)  # [U]
        self.start = np.concatenate([[0], np.cumsum(self.lengths + 1)[:-1]])  # [U]
        rows = []
        for seq in sequences:
            v = unit[np.asarray(seq, dtype=np.int64)]  # [len, D]
            cs = np.vstack([np.zeros((1, unit.shape[1])), np.cumsum(v, axis=0)])  # [len + 1, D]
            lo = np.maximum(np.arange(len(seq) + 1) - window, 0)
            w = cs - cs[lo]  # [len + 1, D] sum over the last `window` items
            rows.append(w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12))
        self.vec = np.vstack(rows) if rows else np.zeros((0, unit.shape[1]))  # [sum(len+1), D]


def _simulate(
    win: _Windows, theta: float, min_history: int, min_gap: int, budget: float, max_credit: float
) -> tuple[int, int]:
    """(requests after the first, decisions after the first) of every user at ``theta``,
    with the gate's per-device credit (:class:`device_ranker.gate.GateState`)."""
    users = np.flatnonzero(win.lengths >= min_history)
    if len(users) == 0:
        return 0, 0
    anchor = win.vec[win.start[users] + min_history].copy()  # [U, D] first request
    since = np.zeros(len(users), dtype=np.int64)
    credit = np.zeros(len(users))
    capped = budget < 1.0
    requests = decisions = 0
    for length in range(min_history + 1, int(win.lengths[users].max()) + 1):
        live = np.flatnonzero(win.lengths[users] >= length)
        now = win.vec[win.start[users[live]] + length]  # [u, D]
        since[live] += 1
        if capped:
            credit[live] = np.minimum(credit[live] + budget, max_credit)
        score = np.clip((1.0 - np.einsum("ud,ud->u", now, anchor[live])) / 2.0, 0.0, 1.0)
        ask = (since[live] >= min_gap) & (score >= theta)
        if capped:
            ask &= credit[live] >= 1.0
        hit = live[ask]
        anchor[hit] = now[ask]
        since[hit] = 0
        credit[hit] -= 1.0
        requests += int(ask.sum())
        decisions += len(live)
    return requests, decisions


def calibrate_gate(
    item_vectors: np.ndarray,
    sequences: Sequence[np.ndarray],
    budgets: Sequence[float],
    *,
    window: int = 10,
    min_history: int = 5,
    min_gap: int = 1,
    max_credit: float = GateConfig.max_credit,
    steps: int = 40,
) -> dict[float, GateCalibration]:
    """Threshold per budget on the training sequences (see the module docstring).

    Args:
        item_vectors: [I, D] the device ranker's item table (the gate's item vectors).
        sequences: per training user, the item indices in time order.
        budgets: fractions in (0, 1].

    Returns:
        budget -> :class:`GateCalibration`.
    """
    vectors = np.asarray(item_vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise ValidationError(f"item_vectors must be [I, D], got shape {vectors.shape}")
    win = _Windows(vectors, sequences, window)
    out: dict[float, GateCalibration] = {}
    for budget in sorted({float(b) for b in budgets}, reverse=True):
        if not 0.0 < budget <= 1.0:
            raise ValidationError(f"gate budget must be in (0, 1], got {budget}")
        if budget >= 1.0:
            req, dec = _simulate(win, 0.0, min_history, min_gap, budget, max_credit)
            theta = 0.0
        else:
            # the threshold is bisected WITHOUT the per-device credit (budget 1 = no cap):
            # with it, every low threshold would hit the cap and the gate would degrade
            # into a timer; the credit only stops devices that shift more than the rest
            lo, hi = 0.0, 1.0
            tried: list[tuple[float, int, int]] = []
            for _ in range(steps):
                mid = (lo + hi) / 2.0
                req, dec = _simulate(win, mid, min_history, min_gap, 1.0, max_credit)
                tried.append((mid, req, dec))
                if dec and req / dec > budget:
                    lo = mid
                else:
                    hi = mid
            theta, req, dec = min(tried, key=lambda t: (abs(t[1] / max(t[2], 1) - budget), -t[0]))
            req, dec = _simulate(win, theta, min_history, min_gap, budget, max_credit)  # as run
        if dec == 0:
            raise ValidationError(
                f"no training user has more than min_history={min_history} events; the gate "
                "cannot be calibrated (lower --min-history or use the timer trigger)"
            )
        out[budget] = GateCalibration(
            budget=budget,
            threshold=float(theta),
            train_rate=req / dec,
            train_decisions=dec,
            window=window,
            min_history=min_history,
            min_gap=min_gap,
            max_credit=max_credit,
        )
        logger.info(
            "gate budget %.3f: threshold %.6f, training request rate %.4f",
            budget,
            theta,
            req / dec,
        )
    return out
