"""Per-user adaptation policies of the device service: A/B arms and their request triggers.

A device server may run an **experiment**: each user belongs to an arm, and the arm's
policy decides whether the user's device adapts at all ("static" never asks the cloud)
and, if it does, what triggers a request: the shift gate (:class:`device_ranker.gate.ShiftGate`,
at the arm's budget, or a fixed threshold) or a timer (:class:`TimerGate`, one request
every ``round(1 / budget)`` events). The arm comes from an injected callable
(:data:`ArmResolver`, user id -> (arm name, policy dict)), so the device never imports the
experiment code or the store: ``recsys serve device --experiment FILE`` builds it from
``recsys.abtest`` and persists the assignments in the prototype store.

A policy dict has the keys of ``recsys.replay.config.PolicySpec``: ``kind`` ("static" or
"system"; "finetune" and "duet" exist only in the offline replay), ``trigger`` ("gate"
or "timer"), ``budget`` (fraction of events that may trigger a request) and optionally
``threshold`` (a fixed shift threshold for the gate, e.g. calibrated offline) and
``name``. The harm-guard keys (``guard``, ``fleet_guard``, ``fleet_proof``, ``guard_z``)
are refused: a device server runs one guard setting for every user (``--guard``), so an
arm cannot have its own (that experiment runs offline, ``recsys abtest run``). Other keys
are ignored. As in the replay, the gate at a 100 % budget is the
timer with period 1 (it asks after every event).

**Staleness** (issue 13): each user's device knows how old its current edit is and how
well it still fits (:class:`Staleness`, kept in
:class:`~device_ranker.service.users.UserState`): events and seconds since the edit (or
the base model) was applied, and the ranks that model gave the user's last K clicks at
the time they were recorded. :class:`StalenessConfig` sets K and an optional rule,
:func:`stale_reason`, that asks the cloud when the edit is older than N events / S
seconds or its fit dropped below a mean reciprocal rank X; the rule is off by default
(every threshold None), so the gate alone decides, as before.

Example::

    policy = ArmPolicy.from_dict({"kind": "system", "trigger": "timer", "budget": 0.2})
    gate = policy.make_gate(GateConfig(), item_vectors)   # a TimerGate asking every 5 events
    stale_reason(StalenessConfig(max_events=20), st.staleness)   # "stale-events" or None
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from device_ranker.gate import GateConfig, GateDecision, GateState, ShiftGate
from recsys.errors import ValidationError
from recsys.validation import config_dataclass

# user id -> (arm name, policy dict with PolicySpec keys); may block (the store), so the
# engine calls it in a worker thread, once per user
ArmResolver = Callable[[str], tuple[str, Mapping[str, Any]]]

KINDS = ("static", "system")
OFFLINE_KINDS = ("finetune", "duet")
GUARD_KEYS = ("guard", "fleet_guard", "fleet_proof", "guard_z")  # offline-only arm keys


@config_dataclass
class ArmPolicy:
    """How the users of one arm adapt.

    Attributes:
        kind: "static" (base model, never asks the cloud) or "system" (cloud edits).
        trigger: "gate" (shift gate) or "timer" (every ``round(1 / budget)`` events).
        budget: target fraction of events that trigger a request, in [0, 1].
        threshold: fixed shift threshold of the gate (None: calibrated from the budget).
    """

    kind: Literal["static", "system"] = "system"
    trigger: Literal["gate", "timer"] = "gate"
    budget: float = Field(0.2, ge=0.0, le=1.0)
    threshold: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("kind", mode="before")
    @classmethod
    def _device_kind(cls, kind: Any) -> Any:
        if kind in OFFLINE_KINDS:  # say why, not only which kinds exist
            raise ValueError(
                f"policy kind {kind!r} runs only in the offline replay; a device arm must be "
                f"one of {list(KINDS)}"
            )
        return kind

    @property
    def adaptive(self) -> bool:
        return self.kind != "static"

    @classmethod
    def from_dict(cls, policy: Mapping[str, Any]) -> ArmPolicy:
        """A policy dict (PolicySpec keys) -> :class:`ArmPolicy` (validated)."""
        if not isinstance(policy, Mapping):
            raise ValidationError(f"an arm policy must be a mapping, got {type(policy).__name__}")
        # set = anything but absent / None / False (a guard_z of 0.0 is a level, not "off")
        per_arm_guard = [
            k for k in GUARD_KEYS if policy.get(k) is not None and policy.get(k) is not False
        ]
        if per_arm_guard:
            raise ValidationError(
                f"arm policy {dict(policy)!r} sets {per_arm_guard}: a device server runs one "
                "harm-guard setting for every user (recsys serve device --guard / "
                "--guard-report, recsys serve cloud --fleet-guard), so arms cannot differ in "
                "it; drop these keys from the arms, or compare guard settings offline with "
                "recsys abtest run"
            )
        try:
            threshold = policy.get("threshold")
            return cls(
                kind=str(policy.get("kind", "system")),
                trigger=str(policy.get("trigger", "gate")),
                budget=float(policy.get("budget", 1.0)),
                threshold=None if threshold is None else float(threshold),
            )
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"bad arm policy {dict(policy)!r}: {exc}") from None

    def make_gate(
        self, base: GateConfig, item_vectors: np.ndarray | None
    ) -> ShiftGate | TimerGate | None:
        """The arm's request trigger (window, min_history, min_gap from ``base``); None
        for a static arm."""
        if not self.adaptive:
            return None
        cfg = replace(base, budget=self.budget, threshold=self.threshold)
        if self.trigger == "timer" or (self.budget >= 1.0 and self.threshold is None):
            return TimerGate(cfg)  # a gate at a 100 % budget asks after every event
        return ShiftGate(cfg, item_vectors=item_vectors)


class TimerGate:
    """Periodic requests: the baseline the shift gate must beat at the same budget.

    A device asks as soon as it has ``min_history`` events (like the shift gate's "first"
    request), then every ``period = round(1 / budget)`` events (never at budget 0). It
    has the shift gate's three methods, so the engine uses either.
    """

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self.period = round(1.0 / config.budget) if config.budget > 0 else 0
        self.events = 0
        self.requests = 0

    def threshold(self) -> float:
        """Not a shift threshold: reported as the period in events (+inf: never)."""
        return float(self.period) if self.period else float("inf")

    def decide(self, history: Sequence[int], state: GateState) -> GateDecision:
        self.events += 1
        state.events_since_request += 1
        if not self.period or len(history) < self.config.min_history:
            return GateDecision(False, 0.0, self.threshold(), "short")
        if state.anchor is None:
            return GateDecision(True, 1.0, self.threshold(), "first")
        due = state.events_since_request >= self.period
        return GateDecision(due, 0.0, self.threshold(), "timer" if due else "below")

    def on_request(self, history: Sequence[int], state: GateState) -> None:
        state.anchor = frozenset(history[-self.config.window :])
        state.events_since_request = 0
        self.requests += 1


# ---- staleness of the active edit -------------------------------------------------------------
@config_dataclass
class StalenessConfig:
    """What the device tracks about its current edit, and the optional staleness rule.

    Attributes:
        fit_clicks: K, the clicks whose ranks make the fit signal (0 = do not track the
            fit; then no click is ranked for it).
        fit_every_click: also rank a click no ranking of the user preceded (one scoring
            pass: ~1.5 ms on ml-100k on a shared 2-core machine, where ranking it from the
            preceding Recommend's scores costs ~25 us); False = such clicks are not
            counted (the fit is over the clicks the device had ranked).
        max_events: request when the current edit is at least this many events old
            (None = off).
        max_seconds: request when it is at least this old, in the events' clock (or wall
            seconds when events carry no time; None = off).
        min_fit_mrr: request when the mean reciprocal rank of the last ``fit_clicks``
            clicks under the current edit drops below this (None = off).
        min_fit_clicks: clicks under the current edit before the fit rule may fire.

    The rule only adds requests the gate would not make: never before the user's first
    request, never within the gate's ``min_gap`` of the last request, never for a static
    arm. A request it triggers spends gate credit like a shift request.
    """

    fit_clicks: int = Field(5, ge=0, le=1000)
    fit_every_click: bool = False
    max_events: int | None = Field(None, ge=1)
    max_seconds: float | None = Field(None, gt=0)
    min_fit_mrr: float | None = Field(None, gt=0.0, le=1.0)
    min_fit_clicks: int = Field(3, ge=1)

    @property
    def rule_on(self) -> bool:
        return any(v is not None for v in (self.max_events, self.max_seconds, self.min_fit_mrr))


@dataclass
class Staleness:
    """Age and fit of one user's current edit (or of the base model when it has none).

    Attributes:
        events: events recorded since the edit was applied (or reverted, or the user was
            created: the base model's age).
        applied_event_time: the user's event clock when it was applied (the timestamp of
            its last event then; None = the user had no event yet).
        applied_wall: wall time of the apply, unix seconds.
        ranks: 1-based ranks of the clicks recorded since the apply (the last K), each
            under the model the user was served when it was recorded (the catalogue minus
            the user's history; ties pessimistic, as the probes of Recommend).
    """

    events: int = 0
    applied_event_time: int | None = None
    applied_wall: float = field(default_factory=time.time)
    ranks: deque[int] = field(default_factory=lambda: deque(maxlen=5))

    def reset(self, event_time: int | None) -> None:
        """A new edit (or the base model) became current."""
        self.events, self.applied_event_time = 0, event_time
        self.applied_wall = time.time()
        self.ranks.clear()

    def age_seconds(self, last_event_time: int | None) -> tuple[float, str]:
        """(age, clock): in the events' clock ("event": the last event's timestamp minus
        the one at the apply) when both are known and the clock is running, else wall
        seconds ("wall")."""
        t0 = self.applied_event_time
        if t0 is not None and last_event_time is not None and last_event_time > 0:
            return float(max(last_event_time - t0, 0)), "event"
        return max(time.time() - self.applied_wall, 0.0), "wall"

    def fit(self) -> tuple[float, float, int]:
        """(mean reciprocal rank, mean rank, clicks) of the recorded ranks; NaN, NaN, 0
        before any click under the current edit."""
        n = len(self.ranks)
        if not n:
            return float("nan"), float("nan"), 0
        r = np.fromiter(self.ranks, np.float64, n)
        return float((1.0 / r).mean()), float(r.mean()), n


def stale_reason(
    cfg: StalenessConfig, staleness: Staleness, last_event_time: int | None = None
) -> str | None:
    """Why the current edit is stale under ``cfg``'s rule ("stale-events", "stale-time",
    "stale-fit"), or None (fresh, or the rule is off)."""
    if cfg.max_events is not None and staleness.events >= cfg.max_events:
        return "stale-events"
    if cfg.max_seconds is not None:
        age, _ = staleness.age_seconds(last_event_time)
        if age >= cfg.max_seconds:
            return "stale-time"
    if cfg.min_fit_mrr is not None:
        mrr, _, n = staleness.fit()
        if n >= cfg.min_fit_clicks and mrr < cfg.min_fit_mrr:
            return "stale-fit"
    return None
