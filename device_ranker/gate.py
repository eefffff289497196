"""The request gate: decides per event whether a device asks the cloud for a new edit.

IntellectReq-style (WWW'24): requesting an edit at every event wastes the uplink and the
cloud; requesting never lets the edit go stale. The gate compares the device's **recent
window** (its last W items) with the **window at its last edit** and asks again when the
distribution has shifted enough:

    v(window)  = mean of the L2-normalised item vectors of the window's items      [D]
    shift      = (1 - cos(v(recent), v(anchor))) / 2                   in [0, 1]

(0 = same direction, 1 = opposite; without item vectors, the share of recent items not in
the anchor window.) The threshold comes from a **budget**: the target fraction of events
that may trigger a request. The gate keeps the last ``calibration`` eligible scores of
all its devices and uses their ``1 - budget`` quantile, so the request rate follows the
budget whatever the scale of the scores; a fixed ``threshold`` overrides it. A device
with no edit yet asks as soon as it has ``min_history`` events; after a request it waits
``min_gap`` events before the next.

The replay evaluation refines the gate later (issue 7): anything with the same three
methods (:meth:`ShiftGate.decide`, :meth:`ShiftGate.on_request`, :meth:`ShiftGate.threshold`)
can replace it.

Shapes: I items, D item-vector width, W window length.

Example::

    gate = ShiftGate(GateConfig(budget=0.2, window=10), item_vectors=item_table)  # [I, D]
    state = GateState()
    decision = gate.decide(history, state)        # GateDecision(request, score, threshold, reason)
    if decision.request:
        gate.on_request(history, state)           # the current window becomes the anchor
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from recsys.errors import ValidationError
from recsys.validation import config_dataclass

logger = logging.getLogger(__name__)


@config_dataclass
class GateConfig:
    """Request-gate settings.

    Attributes:
        budget: target fraction of events that trigger a request, in [0, 1].
        window: W, recent events compared with the anchor window.
        min_history: events a device needs before its first request.
        min_gap: events between two requests of one device (>= 1).
        threshold: fixed shift threshold in [0, 1] (None = calibrated from ``budget``).
        calibration: recent eligible scores (all devices) the budget quantile uses.
        max_credit: the per-device request allowance's cap (see :class:`GateState`):
            how many requests a device may save up for a burst (>= 1).
    """

    budget: float = Field(0.2, ge=0.0, le=1.0)
    window: int = Field(10, ge=1)
    min_history: int = Field(5, ge=1)
    min_gap: int = Field(5, ge=1)
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    calibration: int = Field(1000, ge=1)
    max_credit: float = Field(2.0, ge=1.0)


@dataclass
class GateState:
    """One device's gate state.

    Attributes:
        anchor: window vector [D] (or item set) at the last request; None = never asked.
        events_since_request: events recorded since the last request.
        last_score: the last shift score computed.
        credit: the device's request allowance: after its first request it earns
            ``budget`` per event (up to ``max_credit``) and a shift request spends 1, so
            its requests after the first never exceed ``budget`` x its events (+ the
            cap): the budget holds per device whatever the threshold does.
    """

    anchor: np.ndarray | frozenset[int] | None = None
    events_since_request: int = 0
    last_score: float = 0.0
    credit: float = 0.0


@dataclass(frozen=True)
class GateDecision:
    """The gate's answer for one event.

    ``reason``: "first" (no edit yet), "shift" (score >= threshold), "below",
    "cooldown" (fewer than ``min_gap`` events since the last request), "budget" (score
    high enough but the device's request credit is spent) or "short" (fewer than
    ``min_history`` events).
    """

    request: bool
    score: float
    threshold: float
    reason: str


@dataclass
class _Calibration:
    scores: deque[float] = field(default_factory=deque)


class ShiftGate:
    """The IntellectReq-style shift gate (see the module docstring).

    Args:
        config: :class:`GateConfig`.
        item_vectors: optional float [I, D] item vectors (the ranker's item table); rows
            are L2-normalised here. Without them the score is set-based.
    """

    def __init__(self, config: GateConfig | None = None, item_vectors: np.ndarray | None = None):
        self.config = config or GateConfig()
        self.vectors: np.ndarray | None = None
        if item_vectors is not None:
            v = np.asarray(item_vectors, dtype=np.float32)
            if v.ndim != 2:
                raise ValidationError(f"item_vectors must be [I, D], got shape {v.shape}")
            norms = np.linalg.norm(v, axis=1, keepdims=True)
            self.vectors = v / np.maximum(norms, 1e-12)
        self._cal = _Calibration(deque(maxlen=self.config.calibration))
        self.events = 0
        self.requests = 0

    # ---- scores ---------------------------------------------------------------------------
    def window_summary(self, history: Sequence[int]) -> np.ndarray | frozenset[int]:
        """The last W items as a mean unit vector [D] (or an item set without vectors)."""
        items = np.asarray(history[-self.config.window :], dtype=np.int64)
        if self.vectors is None:
            return frozenset(items.tolist())
        if len(items) == 0:
            return np.zeros(self.vectors.shape[1], dtype=np.float32)
        mean = self.vectors[items].mean(axis=0)  # [D]
        return mean / max(float(np.linalg.norm(mean)), 1e-12)

    def shift_score(self, history: Sequence[int], state: GateState) -> float:
        """Shift between the recent window and the anchor window, in [0, 1] (1 if no anchor)."""
        if state.anchor is None:
            return 1.0
        now = self.window_summary(history)
        if isinstance(state.anchor, frozenset) or isinstance(now, frozenset):
            recent = now if isinstance(now, frozenset) else frozenset()
            anchor = state.anchor if isinstance(state.anchor, frozenset) else frozenset()
            return len(recent - anchor) / len(recent) if recent else 0.0
        cos = float(np.dot(now, state.anchor))
        return float(np.clip((1.0 - cos) / 2.0, 0.0, 1.0))

    def threshold(self) -> float:
        """The current threshold: the fixed one, or the ``1 - budget`` quantile of the
        recent eligible scores (1.0 before any score; > 1 when the budget is 0)."""
        cfg = self.config
        if cfg.threshold is not None:
            return cfg.threshold
        if cfg.budget <= 0.0:
            return float("inf")
        if not self._cal.scores:
            return 1.0
        return float(np.quantile(np.fromiter(self._cal.scores, float), 1.0 - cfg.budget))

    # ---- decisions --------------------------------------------------------------------------
    def decide(self, history: Sequence[int], state: GateState) -> GateDecision:
        """Score the event just appended to ``history`` and decide (does not change the
        anchor: call :meth:`on_request` when the request is actually sent)."""
        cfg = self.config
        self.events += 1
        state.events_since_request += 1
        if len(history) < cfg.min_history:
            return GateDecision(False, 0.0, self.threshold(), "short")
        if state.anchor is None:
            state.last_score = 1.0
            return GateDecision(True, 1.0, self.threshold(), "first")
        score = self.shift_score(history, state)
        state.last_score = score
        if cfg.budget < 1.0:
            state.credit = min(state.credit + cfg.budget, cfg.max_credit)
        if state.events_since_request < cfg.min_gap:
            return GateDecision(False, score, self.threshold(), "cooldown")
        threshold = self.threshold()
        self._cal.scores.append(score)
        if score < threshold:
            return GateDecision(False, score, threshold, "below")
        if cfg.budget < 1.0 and state.credit < 1.0:
            return GateDecision(False, score, threshold, "budget")
        return GateDecision(True, score, threshold, "shift")

    def on_request(self, history: Sequence[int], state: GateState) -> None:
        """A request was sent for ``history``: its window becomes the new anchor (a
        request after the first spends one credit)."""
        if state.anchor is not None and self.config.budget < 1.0:
            state.credit -= 1.0
        state.anchor = self.window_summary(history)
        state.events_since_request = 0
        self.requests += 1

    def stats(self) -> dict[str, float]:
        return {
            "events": self.events,
            "requests": self.requests,
            "request_rate": self.requests / self.events if self.events else 0.0,
            "threshold": self.threshold(),
            "budget": self.config.budget,
        }
