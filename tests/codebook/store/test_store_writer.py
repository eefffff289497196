"""The write-behind writer and reserved edit ids, on SQLite and PostgreSQL: batched
transactions, refinements through several writers lose no update, reserved ids keep
increasing across restarts and never collide with rows written without a reservation."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from codebook.store import PrototypeStore, VersionContent
from codebook.store.repository import DeviceRepository, EditLogRepository
from codebook.store.writer import StoreWriter, WriteOp, WriterConfig
from recsys.errors import ValidationError
from recsys.serving.errors import status_for


def _log_op(edit_id: int, device: str) -> WriteOp:
    return WriteOp(
        "edit log",
        apply=lambda s: EditLogRepository(s).add(
            id=edit_id, device_id=device, tokens="", prototype_id=None,
            prototype_version=None, edit_norm=0.0, payload_bytes=1, latency_ms=0.0,
        ),
    )  # fmt: skip


def test_batched_writes_and_counters(store: PrototypeStore, db_url: str) -> None:
    p = store.create_prototype("p", VersionContent(code=np.zeros(2, np.float32)))
    writer = StoreWriter.open(db_url)
    gate = threading.Event()
    try:  # hold the writer on a first op so the next ones queue up and batch together
        writer.submit(WriteOp("wait", run=lambda _store: gate.wait(10)))
        ids = store.reserve_ids(40)
        for n, i in enumerate(ids):
            writer.submit(_log_op(i, f"d{n}"))
            writer.submit(WriteOp("assign", apply=lambda s, n=n: DeviceRepository(s).assign(
                f"d{n}", p.prototype_id)))  # fmt: skip
        gate.set()
        assert writer.flush(20)
        stats = writer.stats()
        assert stats["written"] == 81 and stats["failed"] == stats["dropped"] == 0
        assert stats["batches"] < 10  # 80 queued writes in a few transactions
        assert [e.id for e in store.edits_for_device("d7")] == [ids[7]]
        assert store.get_device_assignment("d39").prototype_id == p.prototype_id
    finally:
        writer.close()


def test_refinements_through_two_writers_lose_no_update(store: PrototypeStore, db_url) -> None:
    p = store.create_prototype("p", VersionContent(code=np.zeros(2, np.float32)))
    writers = [StoreWriter.open(db_url) for _ in range(2)]

    def bump(latest):
        return VersionContent(code=latest.code + 1, member_count=latest.member_count + 1)

    try:
        for _ in range(15):
            for w in writers:
                w.submit(
                    WriteOp("refinement", run=lambda s: s.refine_prototype(p.prototype_id, bump))
                )
        assert all(w.flush(60) for w in writers)
        state = store.get_prototype(p.prototype_id)
        assert state.version == 31 and state.member_count == 30 and state.code[0] == 30
        assert sum(w.stats()["failed"] for w in writers) == 0
    finally:
        for w in writers:
            w.close()


def test_reserved_ids_increase_across_restarts(db_url: str) -> None:
    seen = []
    for _ in range(3):  # three "restarts", each leaving most of its block unused
        with PrototypeStore.open(db_url, upgrade=True) as store:
            block = store.reserve_ids(100)
            seen += [block[0], block[1]]
            store.log_edit(device_id="x", tokens="", prototype_id=None, prototype_version=None,
                           edit_norm=0.0, payload_bytes=1, latency_ms=0.0)  # fmt: skip
    assert seen == sorted(set(seen))
    with PrototypeStore.open(db_url) as store:
        logged = [e.id for e in store.edits_for_device("x")]
        assert len(set(logged) | set(seen)) == len(logged) + len(seen)  # no collision
        assert store.reserve_ids(1, above=10**9)[0] == 10**9 + 1
        with pytest.raises(ValidationError):
            store.reserve_ids(0)


def test_store_busy_is_unavailable_not_failed_precondition() -> None:
    import grpc

    from codebook.store import StoreBusyError

    code, _ = status_for(StoreBusyError("refining prototype 1 collided"))
    assert code is grpc.StatusCode.UNAVAILABLE


def test_writer_config_is_validated() -> None:
    with pytest.raises(ValueError):
        WriterConfig(queue_size=0)


def test_counters_are_logged_while_they_change(tmp_path, caplog) -> None:
    import logging
    import time

    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    PrototypeStore.open(url, upgrade=True).close()
    writer = StoreWriter.open(url, WriterConfig(report_every_s=0.05))
    try:
        with caplog.at_level(logging.INFO, logger="codebook.store.writer"):
            writer.submit(WriteOp("nothing", run=lambda store: None))
            time.sleep(0.3)
        reports = [r for r in caplog.records if "'written': 1" in r.getMessage()]
        assert len(reports) == 1  # once when it changed, not every period
    finally:
        writer.close()


def test_an_outage_longer_than_the_retries_counts_failures_fast(tmp_path) -> None:
    import sqlite3
    import time

    path = tmp_path / "s.sqlite"
    PrototypeStore.open(f"sqlite:///{path}", upgrade=True).close()
    writer = StoreWriter.open(f"sqlite:///{path}", WriterConfig(max_attempts=2))
    gate = threading.Event()
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the database stays locked past every retry
    try:
        writer.submit(WriteOp("wait", run=lambda _store: gate.wait(10)))
        for n in range(20):
            writer.submit(_log_op(n + 1, f"d{n}"))
        t0 = time.perf_counter()
        gate.set()
        assert writer.flush(20)
        # one batch given up as a whole (transient: not split into 20 retried writes)
        assert time.perf_counter() - t0 < 3.0
        stats = writer.stats()
        assert stats["failed"] == 20 and stats["retried"] == 1, stats
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        writer.close()
