"""Store writes off the hot path (issue 16, item 2): GenerateEdit answers from memory while
the database is locked, a failed or dropped write never fails an answered request, the
writer flushes on a graceful stop, refinements land through the writer."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from cloud_helpers import HEAD, ITEMS, start

from codebook.store.repository import EditLogRepository
from codebook.store.writer import StoreWriter, WriterConfig
from llm_cloud.service.engine import EditRequest
from llm_cloud.service.tiny import build_tiny_engine
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc


def _request(device: str, n: int = 0) -> cpb.GenerateEditRequest:
    items = [ITEMS[(n + k) % len(ITEMS)] for k in (1, 4, 7)]
    return cpb.GenerateEditRequest(device_id=device, recent_item_ids=items)


def _rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


class _HeldLock:
    """The SQLite database's write lock, held by another connection until released."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def test_locked_database_does_not_delay_edits_and_rows_follow(bg, catalogue, tmp_path) -> None:
    store = tmp_path / "s.sqlite"
    cloud = start(bg, catalogue, store)
    assert cloud.writer is not None
    stopped = False
    try:
        lock = _HeldLock(store)  # every writer transaction now waits, then retries
        released = threading.Timer(1.5, lock.release)
        released.start()
        with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as ch:
            stub = cpb_grpc.AdaptationServiceStub(ch)
            answered = []
            for n in range(8):
                t0 = time.perf_counter()
                reply = stub.GenerateEdit(_request(f"d{n}", n), timeout=1.0)  # device deadline
                answered.append((time.perf_counter() - t0, reply.edit_id, f"d{n}"))
        released.join()
        assert max(s for s, _, _ in answered) < 0.5, answered  # never waited on the lock
        ids = [i for _, i, _ in answered]
        assert ids == sorted(set(ids))
        bg.run(cloud.stop(5))  # graceful: the writer flushes its queue
        stopped = True
        stats = cloud.writer.stats()
        assert stats["retried"] >= 1 and stats["failed"] == 0 and stats["queued"] == 0, stats
        logged = _rows(store, "SELECT id, device_id FROM edit_log ORDER BY id")
        assert logged == [(i, d) for _, i, d in answered]
        assigned = {d for (d,) in _rows(store, "SELECT device_id FROM device_assignments")}
        assert assigned == {d for _, _, d in answered}
    finally:
        if not stopped:
            bg.run(cloud.stop(0))


def _engine(tmp_path: Path, config: WriterConfig | None = None):
    engine = build_tiny_engine(ITEMS, HEAD, store_url=f"sqlite:///{tmp_path / 's.sqlite'}")
    writer = StoreWriter.open(engine.store.engine.url, config)
    engine.attach_writer(writer)
    return engine, writer


def _edits(engine, devices, offset: int = 0):
    return engine.generate_edits(
        [EditRequest(d, np.array([n + offset, n + 1, n + 2]) % len(ITEMS))
         for n, d in enumerate(devices)]
    )  # fmt: skip


def test_failed_log_write_does_not_fail_the_answered_batch(tmp_path, monkeypatch) -> None:
    engine, writer = _engine(tmp_path)
    try:
        real_add = EditLogRepository.add

        def add(self, **row):
            if row["device_id"] == "poison":
                raise ValueError("a row the database refuses")
            return real_add(self, **row)

        monkeypatch.setattr(EditLogRepository, "add", add)
        results = _edits(engine, ["a", "poison", "b"])
        assert all(not isinstance(r, Exception) for r in results)  # all three answered
        good = _edits(engine, ["c"])
        assert writer.flush(10)
        stats = writer.stats()
        assert stats["failed"] == 1 and stats["dropped"] == 0, stats
        logged = [e.id for e in engine.store.edits_for_device("c")]
        assert logged == [good[0].edit_id]  # the next batch was written
    finally:
        writer.close()
        engine.close()


def test_full_queue_drops_and_counts_but_never_blocks_long(tmp_path) -> None:
    engine, writer = _engine(tmp_path, WriterConfig(queue_size=2, full_wait_s=0.01))
    lock = _HeldLock(tmp_path / "s.sqlite")
    try:
        times = []
        for n in range(12):
            t0 = time.perf_counter()
            results = _edits(engine, [f"x{n}", f"y{n}"], n)
            times.append(time.perf_counter() - t0)
            assert all(not isinstance(r, Exception) for r in results)
        assert writer.stats()["dropped"] >= 1
        # one stall of full_wait_s per overload episode, not one per write
        assert sum(times) < 2.0, times
    finally:
        lock.release()
        writer.close()
        engine.close()


def test_refinements_go_through_the_writer_and_are_installed(tmp_path) -> None:
    engine, writer = _engine(tmp_path)
    try:
        before = {pid: lv.version for pid, lv in engine.bank.live.items()}
        for n in range(6):  # refine_every = 2: several refinements queued
            _edits(engine, [f"r{n}", f"s{n}"], n)
        assert writer.flush(10)
        _edits(engine, ["next"])  # installs what the writer committed
        after = {pid: lv.version for pid, lv in engine.bank.live.items()}
        assert any(after[p] > before[p] for p in before)
        for pid, version in after.items():  # the bank serves committed versions only
            assert engine.store.get_prototype(pid).version >= version
    finally:
        writer.close()
        engine.close()


def test_two_engines_refining_one_store_lose_no_update(tmp_path) -> None:
    """Two cloud engines (own writers) on one SQLite store, edits in parallel threads: each
    stored version builds on the latest one (member counts add up)."""
    first, w1 = _engine(tmp_path)
    second, w2 = _engine(tmp_path)  # loads the bank the first one created
    try:
        initial = {p: first.store.get_prototype(p).member_count for p in first.bank.live}
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(_edits, e, [f"{tag}{n}" for n in range(4)], k)
                    for k in range(8) for e, tag in ((first, "a"), (second, "b"))]  # fmt: skip
            for job in jobs:
                assert all(not isinstance(r, Exception) for r in job.result())
        assert w1.flush(20) and w2.flush(20)
        assert w1.stats()["failed"] == w2.stats()["failed"] == 0
        refined = 0
        for pid, count in initial.items():
            versions = first.store.count_versions(pid)
            refined += versions - 1
            # refine_every = 2: each refinement adds 2 members to the latest version
            assert first.store.get_prototype(pid).member_count == count + 2 * (versions - 1)
        pending = sum(len(lv.pending_codes) for e in (first, second) for lv in e.bank.live.values())
        assert 2 * refined + pending == 2 * 8 * 4  # every edit is in a version or pending
    finally:
        w1.close()
        w2.close()
        first.close()
        second.close()


def test_bank_assignment_map_is_bounded(tmp_path) -> None:
    engine, writer = _engine(tmp_path)
    try:
        engine.bank.max_tracked = 3
        _edits(engine, [f"dev{n}" for n in range(8)])
        assert len(engine.bank._assigned) == 3  # the least recently seen devices dropped
        assert writer.flush(10)
        for n in range(8):  # every assignment was written all the same
            engine.store.get_device_assignment(f"dev{n}")
    finally:
        writer.close()
        engine.close()
