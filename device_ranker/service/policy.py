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
``name``. Other keys are ignored. As in the replay, the gate at a 100 % budget is the
timer with period 1 (it asks after every event).

Example::

    policy = ArmPolicy.from_dict({"kind": "system", "trigger": "timer", "budget": 0.2})
    gate = policy.make_gate(GateConfig(), item_vectors)   # a TimerGate asking every 5 events
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
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
