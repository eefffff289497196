"""Bounded device memory (issue 17 item 3): the per-user byte estimate, its incremental
total, the byte cap's LRU eviction (dropped without a durable state, reloaded with one)
and the GetStatus figures through a real in-process server."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from service_helpers import device_config

from device_ranker.service.config import DeviceConfig
from device_ranker.service.memory import user_bytes
from device_ranker.service.server import start_device
from device_ranker.service.state import DeviceStateStore
from device_ranker.service.users import UserStore
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc

NUM_ITEMS = 2000


def make_store(**kw) -> UserStore:
    cfg = DeviceConfig(checkpoint="unused.pt", **kw)
    items = [f"i{n}" for n in range(NUM_ITEMS)]
    return UserStore(items, cfg, np.zeros((NUM_ITEMS, 8), np.float32))


def fill(store: UserStore, users: range, events: int, seed: int = 0) -> None:
    """Users ``u{n}`` with ``events`` clicks each on random catalogue items."""
    rng = np.random.default_rng(seed)
    shared = list(store.item_index.values())
    for u in users:
        st = store.get(f"u{u}") or store.new_user(f"u{u}")
        for k, i in enumerate(rng.integers(0, NUM_ITEMS, size=events).tolist()):
            st.append(shared[i], 1_700_000_000 + k)
        store.account(st)


def recount(store: UserStore) -> int:
    return sum(user_bytes(st) for st in store.users.values())


@pytest.mark.parametrize("events", [0, 20, 150])
def test_estimate_matches_tracemalloc(events: int) -> None:
    """The Python objects of 400 users (no tensors: those are counted by nbytes) measured
    by tracemalloc are within 15 % of the estimate."""
    store = make_store()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill(store, range(400), events)
        measured = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    estimate = store.bytes_held
    assert estimate == recount(store)
    print(f"{events} events: estimate {estimate / 400:.0f} B/user, measured {measured / 400:.0f}")
    assert abs(estimate - measured) / measured < 0.15, (estimate, measured)


def test_total_is_maintained_incrementally() -> None:
    """Events, cached states / scores, edits' payloads and evictions keep the running
    total equal to a full recount."""
    store = make_store(max_users=50)
    fill(store, range(80), 10)  # 30 evicted by count
    assert len(store.users) == 50 and store.evicted == 30
    assert store.bytes_held == recount(store)
    st = store.get("u79")
    held = store.bytes_held
    st.state = torch.zeros(64)  # [D]
    st.scores = (st.version, None, torch.zeros(NUM_ITEMS))  # [I]
    store.account(st)
    assert store.bytes_held - held >= 4 * (64 + NUM_ITEMS)
    st.install_edit(None, None)  # the hook accounts by itself
    st.edit_payload = b"x" * 5000  # (what install_edit stores with an edit)
    store.account(st)
    assert store.bytes_held == recount(store)
    fill(store, range(100, 130), 5)
    assert store.bytes_held == recount(store)
    gone = store.get("u100")  # a Recommend holds it while the ranking runs ...
    fill(store, range(200, 260), 1)  # ... and other users' calls evict it meanwhile
    assert "u100" not in store.users and gone.meter is None
    gone.scores = (gone.version, None, torch.zeros(NUM_ITEMS))
    store.account(gone)  # the Recommend's accounting after the pass counts nothing
    assert store.bytes_held == recount(store)


def test_byte_cap_evicts_least_recently_used() -> None:
    """Under a byte cap the oldest idle users go first (dropped: no durable state), the
    held bytes stay under the cap, and the most recently used user always stays."""
    probe = make_store()
    fill(probe, range(1), 100)
    per_user = probe.bytes_held
    store = make_store(max_memory_mb=10.5 * per_user / 2**20)  # ten users fit
    fill(store, range(30), 100)
    assert store.bytes_held <= store.max_bytes
    assert list(store.users) == [f"u{n}" for n in range(20, 30)]
    assert store.evicted == 20 and store.evicted_bytes >= 20 * per_user * 0.9
    assert store.get("u0") is None  # dropped without a durable state
    store.get("u20")  # used: now the most recent, u21 is the oldest
    fill(store, range(30, 31), 100)
    assert "u20" in store.users and "u21" not in store.users
    tiny = make_store(max_memory_mb=1e-6)  # a cap below one user still serves the newest
    fill(tiny, range(3), 10)
    assert list(tiny.users) == ["u2"]


def test_byte_cap_evicted_user_reloads_from_state(tmp_path: Path) -> None:
    store = make_store(max_memory_mb=0.02)
    store.durable = DeviceStateStore(tmp_path / "state.sqlite")
    try:
        fill(store, range(1), 60)
        history = list(store.get("u0").history)
        fill(store, range(1, 12), 60, seed=1)
        assert "u0" not in store.users and store.evicted > 0
        st = store.get("u0")  # reloaded from its snapshot, as it was
        assert st is not None and list(st.history) == history and store.reloaded == 1
        assert store.bytes_held == recount(store) and store.bytes_held <= store.max_bytes
    finally:
        store.durable.close()


def test_get_status_reports_memory(bg, artifacts) -> None:
    """GetStatus of a real server: the figures, and evictions under a small cap."""
    handle = bg.run(start_device(device_config(artifacts, max_memory_mb=0.05)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            status = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
            cap = int(0.05 * 2**20)
            assert status.max_memory_bytes == cap and status.max_users == 100_000
            assert 0 < status.memory_bytes <= cap
            assert status.memory_bytes == handle.engine.store.bytes_held
            seeded = status.num_users
            for n in range(40):  # new users, each recommended (cached state and scores)
                user = f"new{n}"
                stub.RecordEvent(pb.RecordEventRequest(user_id=user, item_id="i1", timestamp=n),
                                 timeout=5)  # fmt: skip
                stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=5)
            after = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
            assert after.users_evicted > 0 and after.evicted_bytes > 0
            assert after.memory_bytes <= cap and after.num_users < seeded + 40
            assert after.users_reloaded == 0
    finally:
        bg.run(handle.stop(0))
