"""Request triggers: the timer's exact rate, the gate run exactly as on the device, the
threshold calibrated for a budget on the training period, and which request serves
which event (never one made after seeing the event's target)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay_world import drift_dataset

from device_ranker.gate import GateConfig, GateState, ShiftGate
from recsys.data import time_split, user_sequences
from recsys.replay.config import PolicySpec
from recsys.replay.gate_calibration import calibrate_gate
from recsys.replay.policies import (
    gate_requests,
    serving_request,
    timer_requests,
    trigger_key,
    triggered_by,
)


@given(
    seq_len=st.integers(0, 80),
    start=st.integers(0, 30),
    period=st.integers(1, 12),
    min_history=st.integers(2, 8),
)
@settings(max_examples=200, deadline=None)
def test_timer_requests_every_period_events(seq_len, start, period, min_history) -> None:
    start = min(start, seq_len)
    ls = timer_requests(seq_len, start, period, min_history)
    if seq_len < min_history:
        assert len(ls) == 0
        return
    assert ls[0] == max(start, min_history)  # the first request as soon as possible
    assert (np.diff(ls) == period).all()  # then exactly every `period` events
    assert ls[-1] + period > seq_len


def test_timer_rate_is_exact_over_evaluated_events() -> None:
    ls = timer_requests(seq_len=105, start_len=5, period=5, min_history=5)
    pos = np.arange(5, 105)  # 100 evaluated events, history lengths 5..104
    assert triggered_by(ls, pos).sum() == 20


@given(
    lengths=st.lists(st.integers(0, 60), max_size=12, unique=True).map(sorted),
    positions=st.lists(st.integers(0, 60), max_size=20),
)
def test_an_event_is_served_by_the_latest_request_before_it(lengths, positions) -> None:
    ls, pos = np.asarray(lengths, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    served = serving_request(ls, pos)
    for p, j in zip(pos.tolist(), served.tolist(), strict=True):
        if j < 0:
            assert not (ls <= p).any()
        else:  # made from seq[:L] with L <= p: the target seq[p] was not seen
            assert ls[j] <= p and not ((ls > ls[j]) & (ls <= p)).any()


def test_gate_requests_match_the_device_gate_loop() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 6)).astype(np.float32)
    cfg = GateConfig(window=4, min_history=3, min_gap=2, threshold=0.2)
    seq = rng.integers(0, 50, size=40)
    ours = gate_requests(ShiftGate(cfg, vectors), seq, start_len=6)
    gate, state, asked = ShiftGate(cfg, vectors), GateState(), []
    for length in range(6, len(seq) + 1):  # the device: decide after each recorded event
        if gate.decide(list(seq[:length]), state).request:
            gate.on_request(list(seq[:length]), state)
            asked.append(length)
    assert ours.tolist() == asked and asked[0] == 6 and len(asked) > 2


def test_calibrated_threshold_gives_the_budget_on_the_training_period() -> None:
    ds = drift_dataset()
    train = user_sequences(ds, time_split(ds, quantile=0.8).train)
    vectors = np.random.default_rng(1).normal(size=(ds.num_items, 8))
    cal = calibrate_gate(vectors, train, [1.0, 0.5, 0.2], window=4, min_history=3)
    assert cal[1.0].threshold == 0.0 and cal[1.0].train_rate == 1.0
    assert cal[0.5].threshold <= cal[0.2].threshold
    for b in (0.5, 0.2):
        # bisected without the credit, run with it: the credit only trims the rate
        assert b - 0.1 <= cal[b].train_rate <= b
        # the device gate with the fixed threshold reproduces the training-period rate
        gate = ShiftGate(cal[b].gate_config(), vectors)
        req = dec = 0
        for seq in train:
            ls = gate_requests(gate, seq, start_len=0)
            req += max(len(ls) - 1, 0)
            dec += max(len(seq) - 3, 0)
        assert req / dec == pytest.approx(cal[b].train_rate, abs=0.01)


def test_trigger_keys_share_request_points() -> None:
    assert trigger_key(PolicySpec("static")) is None
    assert trigger_key(PolicySpec("finetune")) == trigger_key(PolicySpec("system", "timer", 0.2))
    assert trigger_key(PolicySpec("system", "gate", 1.0)) == ("timer", 1.0)
    assert trigger_key(PolicySpec("duet", "gate", 0.1)) == ("gate", 0.1)
