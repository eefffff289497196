"""The harm guard: the device's one-edit check and the replay's vectorised decisions agree,
no evidence means accept, and edits that ranked later clicks worse are kept out."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_ranker.guard import GuardConfig, GuardState, HarmGuard, click_gain


def test_click_gain() -> None:
    np.testing.assert_allclose(click_gain(np.array([1, 3])), [1.0, 0.5])


def test_no_evidence_accepts_and_harm_rejects() -> None:
    guard = HarmGuard(GuardConfig(window=4, margin=0.0, min_evidence=2))
    state = GuardState.empty(4)
    assert guard.accept(state)
    state.record(base_rank=1, edit_rank=50)
    assert guard.accept(state)  # one click < min_evidence
    state.record(base_rank=2, edit_rank=40)
    assert not guard.accept(state)  # the edits ranked both clicks far worse
    for _ in range(4):  # the window forgets the bad clicks
        state.record(base_rank=30, edit_rank=2)
    assert guard.accept(state)


def test_margin_tolerates_small_losses() -> None:
    state = GuardState.empty(5)
    for _ in range(5):
        state.record(base_rank=3, edit_rank=4)  # 0.5 -> 0.43: -0.069 per click
    assert not HarmGuard(GuardConfig(margin=0.05)).accept(state)
    assert HarmGuard(GuardConfig(margin=0.1)).accept(state)


@given(
    n=st.integers(0, 40),
    window=st.integers(1, 8),
    margin=st.sampled_from([0.0, 0.02]),
    min_evidence=st.integers(0, 4),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=150, deadline=None)
def test_vectorised_decisions_equal_the_device(n, window, margin, min_evidence, seed) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(1, 100, size=n)
    edit = rng.integers(1, 100, size=n)
    scored = rng.random(n) < 0.8
    diffs = click_gain(edit) - click_gain(base)
    ends = np.sort(rng.integers(0, n + 1, size=5))
    guard = HarmGuard(GuardConfig(window=window, margin=margin, min_evidence=min_evidence))
    got = guard.accept_many(diffs, scored, ends)
    for k, end in enumerate(ends):
        state = GuardState.empty(window)
        for i in range(end):
            if scored[i]:
                state.record(int(base[i]), int(edit[i]))
        assert got[k] == guard.accept(state), (k, end)


def test_config_validation() -> None:
    from recsys.errors import ValidationError

    with pytest.raises(ValidationError):
        GuardConfig(window=0)
    with pytest.raises(ValidationError):
        GuardConfig(margin=-0.1)
