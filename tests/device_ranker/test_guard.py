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
    guard = HarmGuard(GuardConfig(window=4, margin=0.0, min_evidence=2, z=0.0))
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
    assert not HarmGuard(GuardConfig(margin=0.05)).accept(state)  # no spread: se = 0
    assert HarmGuard(GuardConfig(margin=0.1)).accept(state)


def test_the_test_keeps_noisy_evidence_and_rejects_consistent_harm() -> None:
    noisy = GuardState.empty(10)
    for base, edit in [(1, 40), (40, 1), (2, 30), (30, 3)]:  # mean slightly negative
        noisy.record(base_rank=base, edit_rank=edit)
    assert not HarmGuard(GuardConfig(z=0.0)).accept(noisy)
    assert HarmGuard(GuardConfig(z=1.645)).accept(noisy)
    harm = GuardState.empty(10)
    for base, edit in [(1, 40), (2, 30), (1, 25), (3, 50)]:
        harm.record(base_rank=base, edit_rank=edit)
    assert not HarmGuard(GuardConfig(z=1.645)).accept(harm)


@given(
    n=st.integers(0, 40),
    window=st.integers(1, 8),
    margin=st.sampled_from([0.0, 0.02]),
    z=st.sampled_from([0.0, 1.645]),
    min_evidence=st.integers(0, 4),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=150, deadline=None)
def test_vectorised_decisions_equal_the_device(n, window, margin, z, min_evidence, seed) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(1, 100, size=n)
    edit = rng.integers(1, 100, size=n)
    scored = rng.random(n) < 0.8
    diffs = click_gain(edit) - click_gain(base)
    ends = np.sort(rng.integers(0, n + 1, size=5))
    guard = HarmGuard(GuardConfig(window=window, margin=margin, min_evidence=min_evidence, z=z))
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


@given(
    ranks=st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), max_size=60),
    window=st.integers(1, 25),
)
@settings(max_examples=150, deadline=None)
def test_evidence_the_device_records_passes_the_stored_state_check(ranks, window) -> None:
    """What GuardState.record accumulates (the window and cumulative sums, as the device
    keeps and stores them) is always accepted by check_evidence."""
    from device_ranker.guard import check_evidence

    state = GuardState.empty(window)
    n = total = squares = 0.0
    for base, edit in ranks:
        state.record(base, edit)
        d = state.diffs[-1]
        n, total, squares = n + 1, total + d, squares + d * d
    check_evidence(list(state.diffs), n, total, squares, window)


_IMPOSSIBLE = {
    "NaN": ([float("nan")], 1, 0.0, 0.0, 2),
    "more values than clicks": ([0.5, 0.5], 1, 1.0, 0.5, 2),
    "more values than the window": ([0.5, 0.5], 2, 1.0, 0.5, 1),
    "negative clicks": ([], -1, 0.0, 0.0, 2),
    "|sum| > clicks": ([], 2, 2.5, 2.0, 2),
    "sum^2 > clicks * squares": ([0.5], 2, 1.0, 0.26, 2),
    "window squares above the total": ([0.5, 0.5], 2, 1.0, 0.4, 2),
    "window 0": ([], 0, 0.0, 0.0, 0),
}


@pytest.mark.parametrize("args", list(_IMPOSSIBLE.values()), ids=list(_IMPOSSIBLE))
def test_check_evidence_rejects_what_no_device_can_record(args) -> None:
    from device_ranker.guard import check_evidence
    from recsys.errors import ValidationError

    check_evidence([], 0, 0.0, 0.0, 20)  # no click yet
    check_evidence([0.5, -0.25], 4, 0.5, 0.5, 2)
    with pytest.raises(ValidationError):
        check_evidence(*args)
