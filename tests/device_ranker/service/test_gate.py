"""The request gate (device_ranker.gate): scores, budget calibration, cooldown."""

from __future__ import annotations

import numpy as np
import pytest

from device_ranker.gate import GateConfig, GateState, ShiftGate
from recsys.errors import ValidationError


def test_shift_score_vectors() -> None:
    vectors = np.eye(4, dtype=np.float32)
    gate = ShiftGate(GateConfig(window=2, min_history=1, min_gap=1), item_vectors=vectors)
    state = GateState()
    assert gate.decide([0], state).reason == "first"
    gate.on_request([0, 0], state)
    assert gate.shift_score([0, 0], state) == pytest.approx(0.0, abs=1e-6)
    assert gate.shift_score([1, 1], state) == pytest.approx(0.5)  # orthogonal
    assert 0.0 < gate.shift_score([0, 1], state) < 0.5


def test_set_score_without_vectors() -> None:
    gate = ShiftGate(GateConfig(window=4, min_history=1, min_gap=1))
    state = GateState()
    gate.on_request([1, 2, 3, 4], state)
    assert gate.shift_score([1, 2, 3, 4], state) == 0.0
    assert gate.shift_score([1, 2, 7, 8], state) == 0.5


def test_budget_sets_the_request_rate() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 8)).astype(np.float32)
    gate = ShiftGate(GateConfig(budget=0.2, window=5, min_history=5, min_gap=1), vectors)
    states = [GateState() for _ in range(50)]
    histories = [list(rng.integers(0, 200, 5)) for _ in range(50)]
    for s, h in zip(states, histories, strict=True):  # first requests
        gate.on_request(h, s)
    requests = events = 0
    for _ in range(60):
        for s, h in zip(states, histories, strict=True):
            h.append(int(rng.integers(0, 200)))
            d = gate.decide(h, s)
            events += 1
            if d.request:
                requests += 1
                gate.on_request(h, s)
    assert 0.12 < requests / events < 0.3


def test_cooldown_short_history_and_zero_budget() -> None:
    gate = ShiftGate(GateConfig(budget=0.0, min_history=3, min_gap=2, window=2))
    state = GateState()
    assert gate.decide([1], state).reason == "short"
    assert gate.decide([1, 2, 3], state).reason == "first"
    gate.on_request([1, 2, 3], state)
    assert gate.decide([1, 2, 3, 9], state).reason == "cooldown"
    d = gate.decide([1, 2, 3, 9, 8], state)
    assert not d.request and d.reason == "below" and d.threshold == float("inf")


def test_fixed_threshold_and_validation() -> None:
    gate = ShiftGate(GateConfig(threshold=0.0, min_history=1, min_gap=1, budget=1.0))
    state = GateState()
    gate.on_request([1], state)
    assert gate.decide([1, 1], state).request  # a 100 % budget: no credit needed
    with pytest.raises(ValidationError):
        GateConfig(budget=1.5)
    with pytest.raises(ValidationError):
        GateConfig(window=0)
    with pytest.raises(ValidationError):
        ShiftGate(item_vectors=np.zeros(3))


def test_request_credit_caps_a_device_at_its_budget() -> None:
    """With a threshold that every event passes, a device still asks at most ``budget``
    of its events after the first request (plus the saved-up credit)."""
    rng = np.random.default_rng(0)
    gate = ShiftGate(
        GateConfig(budget=0.25, window=3, min_history=2, min_gap=1, threshold=0.0, max_credit=2.0),
        item_vectors=rng.normal(size=(50, 8)),
    )
    state, history, reasons = GateState(), [], []
    for item in rng.integers(0, 50, size=202):
        history.append(int(item))
        d = gate.decide(history, state)
        reasons.append(d.reason)
        if d.request:
            gate.on_request(history, state)
    assert reasons.count("first") == 1
    assert reasons.count("shift") == 50  # 200 events after the first request x 0.25
    assert "budget" in reasons
    with pytest.raises(ValidationError, match="max_credit"):
        GateConfig(max_credit=0.5)
