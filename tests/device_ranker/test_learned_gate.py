"""The learned gate as the device runs it: plain-weight round trip, features equal to the
training-side vectorised ones, the decisions (first, below, budget, cooldown) and the
request points equal to the calibration's simulation."""

from __future__ import annotations

import numpy as np
import pytest

from device_ranker.gate import GateConfig, GateState
from device_ranker.learned_gate import (
    FEATURES,
    GateModel,
    LearnedGate,
    load_gate_model,
    save_gate_model,
)
from recsys.errors import NotFoundError, ValidationError
from recsys.replay.gate_data import Tracks
from recsys.replay.gate_training import simulate
from recsys.replay.policies import learned_requests

F = len(FEATURES)
NUM_ITEMS, D = 40, 6


def _model(hidden: int = 4, seed: int = 0) -> GateModel:
    rng = np.random.default_rng(seed)
    layers = (
        [(rng.normal(size=(F, 1)), rng.normal(size=1))]
        if hidden == 0
        else [
            (rng.normal(size=(F, hidden)), rng.normal(size=hidden)),
            (rng.normal(size=(hidden, 1)), rng.normal(size=1)),
        ]
    )
    return GateModel(
        mean=rng.normal(size=F),
        std=rng.uniform(0.5, 2.0, size=F),
        layers=layers,
        popularity=rng.uniform(size=NUM_ITEMS),
        thresholds={0.1: 0.3, 0.5: -0.2},
        train_rates={0.1: 0.09, 0.5: 0.45},
        meta={"dataset": "toy"},
    )


def _world(users: int = 12, seed: int = 1):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, NUM_ITEMS, size=int(rng.integers(6, 30))) for _ in range(users)]
    ranks = []
    for s in seqs:
        r = rng.integers(1, NUM_ITEMS + 1, size=len(s)).astype(np.float64)
        r[0] = np.nan  # position 0 has no history: no base rank
        ranks.append(r)
    vectors = rng.normal(size=(NUM_ITEMS, D))
    return seqs, ranks, vectors


def test_round_trip_keeps_predictions_and_thresholds(tmp_path) -> None:
    model = _model()
    path = save_gate_model(model, tmp_path / "gate.npz")
    back = load_gate_model(path)
    x = np.random.default_rng(3).normal(size=(9, F))
    np.testing.assert_allclose(back.predict(x), model.predict(x), rtol=1e-12)
    assert back.threshold(0.1) == 0.3 and back.train_rates[0.5] == 0.45
    assert back.meta["dataset"] == "toy"
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickles
        assert "w1" in z and "w2" not in z


def test_linear_prediction_by_hand() -> None:
    model = _model(hidden=0)
    x = np.random.default_rng(4).normal(size=(5, F))
    w, b = model.layers[0]
    want = ((x - model.mean) / model.std) @ w[:, 0] + b[0]
    np.testing.assert_allclose(model.predict(x), want)


def test_bad_files_and_budgets(tmp_path) -> None:
    with pytest.raises(NotFoundError, match="train-gate"):
        load_gate_model(tmp_path / "missing.npz")
    with pytest.raises(NotFoundError, match=r"0\.2"):
        _model().threshold(0.2)
    with pytest.raises(ValidationError, match="1 output"):
        GateModel(np.zeros(F), np.ones(F), [(np.zeros((F, 2)), np.zeros(2))], np.zeros(NUM_ITEMS))
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": "x"}'))
    with pytest.raises(ValidationError, match="learned-gate"):
        load_gate_model(tmp_path / "other.npz")


def test_device_features_equal_the_vectorised_training_features() -> None:
    seqs, ranks, vectors = _world()
    model = _model()
    tracks = Tracks(seqs, ranks, vectors, model.popularity, window=4)
    gate = LearnedGate(model, GateConfig(budget=0.1, window=4), vectors)
    rng = np.random.default_rng(5)
    for u, (s, r) in enumerate(zip(seqs, ranks, strict=True)):
        for _ in range(5):
            length = int(rng.integers(2, len(s) + 1))
            anchor = int(rng.integers(1, length))
            dev = gate.features(s[:length], r[:length], anchor)[0]
            vec = tracks.features(np.array([u]), np.array([length]), np.array([anchor]))[0]
            np.testing.assert_allclose(dev, vec, rtol=1e-5, atol=1e-6)  # float32 vectors
            cached = len(gate._anchors)  # the anchor window's summary is cached by its items
            assert np.array_equal(gate.features(s[:length], r[:length], anchor)[0], dev)
            assert len(gate._anchors) == cached


def test_decisions_first_below_budget_cooldown() -> None:
    _, _, vectors = _world()
    model = _model(hidden=0)
    hist = np.arange(8) % NUM_ITEMS
    ranks = np.full(8, 5.0)
    probe = LearnedGate(model, GateConfig(), vectors, threshold=0.0)
    score = float(model.predict(probe.features(hist, ranks, 5))[0])
    cfg = GateConfig(budget=0.5, window=4, min_history=5, min_gap=1)
    high = LearnedGate(model, cfg, vectors, threshold=score + 1.0)
    low = LearnedGate(model, cfg, vectors, threshold=score - 1.0)
    st = GateState()
    assert high.decide(hist[:4], st, ranks).reason == "short"
    d = high.decide(hist[:5], st, ranks)
    assert d.request and d.reason == "first"
    high.on_request(hist[:5], st)
    assert st.anchor == 5
    assert high.decide(hist[:6], st, ranks).reason == "below"
    st = GateState(anchor=5, credit=0.0)
    assert low.decide(hist[:6], st, ranks).reason == "budget"  # credit 0.5 < 1
    d = low.decide(hist[:7], st, ranks)  # credit 1.0
    assert d.request and d.reason == "shift"
    low.on_request(hist[:7], st)
    assert st.credit == pytest.approx(0.0)
    gap = LearnedGate(model, GateConfig(budget=0.5, window=4, min_gap=3), vectors, threshold=-1e9)
    st = GateState(anchor=5, credit=2.0)
    assert gap.decide(hist[:6], st, ranks).reason == "cooldown"


@pytest.mark.parametrize("budget", [0.5, 0.2])
def test_replay_requests_equal_the_calibration_simulation(budget: float) -> None:
    """The replay's per-device trigger and the training-period simulation that sets the
    threshold make the same number of requests (so the calibrated rate is the device's)."""
    seqs, ranks, vectors = _world(users=15)
    model = _model()
    tracks = Tracks(seqs, ranks, vectors, model.popularity, window=4)
    x = tracks.features(np.zeros(3, dtype=np.int64), np.array([6, 7, 8]), np.array([5, 5, 5]))
    theta = float(np.median(model.predict(x)))
    cfg = GateConfig(budget=budget, window=4, min_history=5, min_gap=1)
    req, dec = simulate(model, tracks, theta, 5, 1, budget, cfg.max_credit)
    total = 0
    for s, r in zip(seqs, ranks, strict=True):
        gate = LearnedGate(model, cfg, vectors, threshold=theta)
        ls = learned_requests(gate, s, 0, r)
        total += max(len(ls) - 1, 0)  # the first request is not a decision
    assert total == req
    assert dec == sum(max(len(s) - 5, 0) for s in seqs)
