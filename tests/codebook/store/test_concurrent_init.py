"""Replicas starting together on one empty store (issue 17, item 4): concurrent schema
migrations and concurrent first prototype seedings, on SQLite and PostgreSQL.

Each "replica" is a separate process (spawn: its own interpreter, engine and
connections) or thread released by a barrier at the same moment. A migration is made to
hold its transaction for 1 s (the work of a bigger migration), longer than the store's
0.25 s lock waits, which is what made a second upgrader fail before the start-up lock
waited for it; the seeding's ``fit`` sleeps too, so every replica finds the store empty
unless it waits for the one that fills it.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from codebook.store import PrototypeStore, VersionContent, migrate
from codebook.store.locks import StartupLockTimeout, exclusive, lock_key, retry_startup
from recsys.errors import RecsysError, ValidationError

# torch and the prototype bank are imported in the tests that use them: the spawned
# upgrade processes import this module, and only need the store (2 s instead of 7 s each)
REPLICAS = 3
HOLD_S = 1.0  # how long a migration / a fit keeps its transaction open
SPEC = (("fc0", 12, 8), ("fc1", 8, 12))
JOIN_S = 120.0


def _slow_upgrade(url: str, hold_s: float) -> str | None:
    """:func:`migrate.upgrade` whose Alembic run takes ``hold_s`` longer, in its
    transaction (so under the start-up lock)."""
    real = migrate.command.upgrade

    def slow(cfg: Any, revision: str) -> None:
        real(cfg, revision)
        time.sleep(hold_s)

    migrate.command.upgrade = slow
    try:
        return migrate.upgrade(url)
    finally:
        migrate.command.upgrade = real


def _upgrade_process(url: str, barrier: Any, out: Any) -> None:
    """Child process: wait for the others, then upgrade (slowly); report the outcome."""
    try:
        barrier.wait(timeout=60)
        out.put(("ok", _slow_upgrade(url, HOLD_S)))
    except BaseException:  # reported to the parent, which fails the test
        out.put(("error", traceback.format_exc(limit=4)))


def _run_processes(target: Callable[..., None], url: str, n: int) -> list[tuple[str, Any]]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=JOIN_S) for _ in procs]
    for p in procs:
        p.join(timeout=JOIN_S)
        assert p.exitcode == 0
    return results


def _run_threads(fn: Callable[[], Any], n: int) -> list[tuple[str, Any]]:
    """``fn()`` in ``n`` threads released together; ("ok", result) or ("error", tb)."""
    barrier = threading.Barrier(n)
    out: queue.Queue[tuple[str, Any]] = queue.Queue()

    def run() -> None:
        try:
            barrier.wait(timeout=60)
            out.put(("ok", fn()))
        except BaseException:  # collected and asserted below
            out.put(("error", traceback.format_exc(limit=6)))

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
    return [out.get_nowait() for _ in threads]


def _errors(results: list[tuple[str, Any]]) -> list[str]:
    return [r for kind, r in results if kind == "error"]


def test_concurrent_upgrades_in_processes(db_url: str) -> None:
    """Three processes migrate one empty database at once, each migration holding its
    transaction 1 s: all succeed (one migrates, the others wait and find it done)."""
    results = _run_processes(_upgrade_process, db_url, REPLICAS)
    assert _errors(results) == []
    assert [r for _, r in results] == [migrate.head_revision()] * REPLICAS
    assert migrate.current_revision(db_url) == migrate.head_revision()
    assert migrate.schema_diff(db_url) == []


def test_concurrent_upgrades_in_threads(db_url: str) -> None:
    results = _run_threads(lambda: _slow_upgrade(db_url, HOLD_S), REPLICAS)
    assert _errors(results) == []
    assert migrate.schema_diff(db_url) == []


@pytest.fixture
def decoder() -> Any:
    """A small ``EditDecoder`` with non-zero output layers (codes [P, 4] -> edits)."""
    import torch

    from codebook.adaptor import DecoderConfig, EditDecoder

    torch.manual_seed(0)
    dec = EditDecoder(
        DecoderConfig(
            head_spec=SPEC, code_dim=4, hidden=8, rank=2, max_weight_norm=0.9, max_bias_abs=0.09
        )
    )
    with torch.no_grad():  # non-zero edits, as from a trained decoder
        for lin in dec.out:
            lin.weight.normal_(0, 0.5)
            lin.bias.normal_(0, 0.5)
    return dec.eval()


def _centroids(seed: int) -> np.ndarray:
    """float32 [3, 4]: a replica's own fit (different per replica: only one may win)."""
    return np.random.default_rng(seed).normal(size=(3, 4)).astype(np.float32)


def test_replicas_seed_one_prototype_set(db_url: str, decoder: Any) -> None:
    """Three replicas start on one empty store at once (migration, then the prototype
    bank): exactly one fits and stores prototypes, all three serve that same set."""
    import torch

    from codebook.prototypes import PrototypeBank, PrototypeConfig

    cfg = PrototypeConfig(num_prototypes=3, residual_rank=2, name_prefix="tiny")
    fits: list[int] = []
    seeds = iter(range(REPLICAS))
    seeds_lock = threading.Lock()

    def start_replica() -> dict[str, Any]:
        with seeds_lock:
            seed = next(seeds)

        def fit() -> dict[str, Any]:
            fits.append(seed)
            time.sleep(HOLD_S)  # every other replica is at its check by now
            return {"centroids": _centroids(seed), "member_counts": np.array([5, 6, 7])}

        with PrototypeStore.open(db_url, upgrade=True) as store:
            with torch.no_grad():
                bank, created = PrototypeBank.load_or_create(
                    store, decoder, SPEC, cfg, bound=1.0, bias_bound=0.1, fit=fit
                )
            return {
                "created": created,
                "versions": {pid: bank.edit(pid)[0] for pid in bank.prototype_ids},
                "codes": {pid: bank.live[pid].code.copy() for pid in bank.prototype_ids},
                "weights": {
                    pid: {k: v.clone() for k, v in bank.edit(pid)[1].items()}
                    for pid in bank.prototype_ids
                },
            }

    results = _run_threads(start_replica, REPLICAS)
    assert _errors(results) == []
    banks = [r for _, r in results]
    assert len(fits) == 1 and sum(b["created"] for b in banks) == 1
    with PrototypeStore.open(db_url) as store:
        stored = store.list_prototypes()
        assert [p.name for p in stored] == ["tiny-0", "tiny-1", "tiny-2"]
        ids = [p.id for p in stored]
        assert all(store.count_versions(i) == 1 for i in ids)
        winner = _centroids(fits[0])
        for k, pid in enumerate(ids):
            np.testing.assert_array_equal(store.get_prototype(pid).code, winner[k])
    for bank in banks:  # every replica serves exactly the stored set
        assert bank["versions"] == dict.fromkeys(ids, 1)
        for k, pid in enumerate(ids):
            np.testing.assert_array_equal(bank["codes"][pid], winner[k])
            for name, w in bank["weights"][pid].items():
                torch.testing.assert_close(w, banks[0]["weights"][pid][name], rtol=0, atol=0)


def test_seed_prototypes_loads_after_restart_and_keeps_spawned(db_url: str) -> None:
    """A later start finds the seeded set (and prototypes spawned since) and makes none."""
    code = np.arange(4, dtype=np.float32)
    with PrototypeStore.open(db_url, upgrade=True) as store:
        made, created = store.seed_prototypes(
            "p", lambda: [("p-0", VersionContent(code=code)), ("p-1", VersionContent(code=-code))]
        )
        assert created and [s.name for s in made] == ["p-0", "p-1"]
        store.create_prototype("p-2", VersionContent(code=code + 1), reason="spawn")
        store.create_prototype("p_other-0", VersionContent(code=code))  # '_' is not a wildcard

        def must_not_run() -> list[tuple[str, VersionContent]]:
            raise AssertionError("the prototypes exist: nothing to make")

        again, created = store.seed_prototypes("p", must_not_run)
        assert not created and [s.name for s in again] == ["p-0", "p-1", "p-2"]
        np.testing.assert_array_equal(again[1].code, -code)
        others, created = store.seed_prototypes("q", lambda: [("q-0", VersionContent(code=code))])
        assert created and [s.name for s in others] == ["q-0"]


def test_seed_prototypes_is_all_or_nothing(db_url: str) -> None:
    """A bad item rolls the whole seeding back: no half-filled set for the next start."""
    code = np.zeros(4, np.float32)
    with PrototypeStore.open(db_url, upgrade=True) as store:
        with pytest.raises(ValidationError, match="not named"):
            store.seed_prototypes(
                "p",
                lambda: [("p-0", VersionContent(code=code)), ("x-1", VersionContent(code=code))],
            )
        with pytest.raises(ValidationError, match="no prototypes"):
            store.seed_prototypes("p", lambda: [])
        assert store.list_prototypes() == []
        states, created = store.seed_prototypes("p", lambda: [("p-0", VersionContent(code=code))])
        assert created and len(states) == 1


def test_a_held_startup_lock_times_out_with_a_clear_error(db_url: str) -> None:
    """A start-up lock held past the timeout: StartupLockTimeout naming the work, after
    about the timeout (not the 0.25 s lock wait of request-path transactions)."""
    with PrototypeStore.open(db_url, upgrade=True) as holder, PrototypeStore.open(db_url) as other:
        key = lock_key("seed prototypes p")
        with holder.transaction(write=True) as session:
            exclusive(session.connection(), key)

            def once() -> None:
                with other.transaction(write=True) as s2:
                    exclusive(s2.connection(), key, timeout_s=0.5)

            with pytest.raises(StartupLockTimeout, match="seeding p"):
                retry_startup(once, what="seeding p", timeout_s=0.5)


def test_exclusive_on_sqlite_needs_a_write_transaction(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    with (
        PrototypeStore.open(url, upgrade=True) as store,
        store.transaction(write=False) as session,
        pytest.raises(RecsysError, match="BEGIN"),
    ):
        exclusive(session.connection(), lock_key("x"))
