"""Concurrent writers lose no update: refinement by threads and by processes, and racing
arm assignments, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from codebook.store import PrototypeStore
from codebook.store.bench import RefineBenchResult, run_refine_benchmark


def assert_serial_history(db_url: str, result: RefineBenchResult) -> None:
    """Every refinement landed exactly once, each on top of the previous version."""
    assert result.lost_updates == 0
    assert result.counter == result.expected
    assert result.versions == result.final_version == result.expected + 1
    with PrototypeStore.open(db_url) as store:
        history = store.changes_since(result.prototype_id, 0)
        assert [s.version for s in history] == list(range(1, result.expected + 2))
        # version v holds counter v - 1: nobody refined from a stale version
        np.testing.assert_array_equal(
            [s.code[0] for s in history], np.arange(result.expected + 1, dtype=np.float64)
        )
        assert [s.member_count for s in history] == list(range(result.expected + 1))
        assert all(s.parent is not None and s.parent.version == s.version - 1 for s in history[1:])


def test_eight_threads_refining_one_prototype_lose_no_update(db_url: str) -> None:
    result = run_refine_benchmark(db_url, writers=8, per_writer=10, mode="threads")
    assert_serial_history(db_url, result)


def test_four_processes_refining_one_prototype_lose_no_update(db_url: str) -> None:
    result = run_refine_benchmark(db_url, writers=4, per_writer=10, mode="processes")
    assert_serial_history(db_url, result)


def test_optimistic_strategy_also_loses_no_update(db_url: str) -> None:
    result = run_refine_benchmark(
        db_url, writers=4, per_writer=5, mode="threads", strategy="optimistic"
    )
    assert_serial_history(db_url, result)


def test_racing_arm_assignments_agree_on_one_arm(store: PrototypeStore) -> None:
    exp = store.create_experiment("race", "salt")
    users = [f"u{i}" for i in range(15)]
    writers = 6
    barrier = threading.Barrier(writers)
    answers: dict[int, list] = {}
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            barrier.wait()
            answers[k] = [store.get_or_create_arm(exp.id, u, f"arm-{k}") for u in users]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, user in enumerate(users):
        per_user = [answers[k][i] for k in range(writers)]
        assert len({a.arm for a in per_user}) == 1, f"{user} got several arms"
        assert sum(a.created for a in per_user) == 1, f"{user} was created more than once"
        # idempotent afterwards too
        assert store.get_or_create_arm(exp.id, user, "other").arm == per_user[0].arm
    assert sum(store.arm_counts(exp.id).values()) == len(users)


@pytest.mark.parametrize("strategy", ["lock", "optimistic"])
def test_unknown_strategy_is_rejected(strategy: str, tmp_path) -> None:
    from recsys.errors import ValidationError

    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    with PrototypeStore.open(url, upgrade=True, refine_strategy=strategy) as store:
        assert store.refine_strategy == strategy
        with pytest.raises(ValidationError, match="strategy"):
            store.refine_prototype(1, lambda s: s, strategy="hope")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="refine_strategy"):
        PrototypeStore.open(url, refine_strategy="hope")  # type: ignore[arg-type]


def test_transient_collisions_are_retried_then_give_up(store: PrototypeStore, caplog) -> None:
    """A transient error is retried (counted, logged at WARNING) up to ``max_attempts``,
    then StoreBusyError; the committed version stays current."""
    from codebook.store import StoreBusyError, VersionContent
    from codebook.store.repository import VersionConflict

    p = store.create_prototype("busy", VersionContent(code=np.zeros(4, np.float32)))
    store.max_attempts = 3
    calls = []

    def always_collides(state):
        calls.append(state.version)
        raise VersionConflict("another writer moved current_version")

    with (
        caplog.at_level("WARNING", logger="codebook.store.service"),
        pytest.raises(StoreBusyError, match="collided with other writers 3 times") as err,
    ):
        store.refine_prototype(p.prototype_id, always_collides)
    assert isinstance(err.value.__cause__, VersionConflict)
    assert calls == [1, 1, 1] and store.retries == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "attempt 1 collided" in warnings[0].getMessage()
    assert store.get_prototype(p.prototype_id).version == 1

    # a collision that clears on the second try costs one retry and lands once
    flaky = iter([True, False])

    def collides_once(state):
        if next(flaky):
            raise VersionConflict("moved")
        return VersionContent(code=state.code + 1)

    assert store.refine_prototype(p.prototype_id, collides_once).version == 2
    assert store.retries == 3


def test_other_errors_are_not_retried(store: PrototypeStore) -> None:
    from codebook.store import VersionContent

    p = store.create_prototype("plain", VersionContent(code=np.zeros(4, np.float32)))
    calls = []

    def broken(state):
        calls.append(1)
        raise KeyError("a bug in the update")

    with pytest.raises(KeyError, match="a bug"):
        store.refine_prototype(p.prototype_id, broken)
    assert calls == [1] and store.retries == 0
