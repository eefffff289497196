"""Durable device state (issue 16, item 3), in process: histories, cloud and pushed edits
survive a restart; bounded users with LRU eviction, evicted users reloaded as they were;
compaction; a failed state write is UNAVAILABLE and changes nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest
import torch
from service_helpers import device_config

from device_ranker.edits import random_edit
from device_ranker.service.server import start_device
from device_ranker.service.state import DeviceStateStore, StateWriteError
from recsys.edit_payload import encode_payload
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc


class _Device:
    """A device server in this process on a state file, with a stub."""

    def __init__(self, bg, artifacts, cloud_port: int | None = None, **kw) -> None:
        self.bg = bg
        self.handle = bg.run(start_device(device_config(artifacts, cloud_port, **kw)))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.handle.port}")
        self.stub = pb_grpc.RecommendationServiceStub(self.channel)

    def event(self, user: str, item: str, t: int, **kw) -> pb.RecordEventResponse:
        req = pb.RecordEventRequest(user_id=user, item_id=item, timestamp=t, **kw)
        return self.stub.RecordEvent(req, timeout=10)

    def status(self, user: str) -> pb.UserStatus:
        return self.stub.GetStatus(pb.GetStatusRequest(user_id=user), timeout=10).user

    def top(self, user: str) -> list[tuple[str, float]]:
        rec = self.stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=10)
        return [(it.item_id, round(it.score, 5)) for it in rec.items]

    def stop(self) -> None:
        self.channel.close()
        self.bg.run(self.handle.stop(0))


def _push(dev: _Device, user: str, seed: int) -> pb.ApplyEditResponse:
    head = dev.handle.engine.ranker.model.head
    edit = random_edit(head, rank=2, scale=0.3, bias=False,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    req = pb.ApplyEditRequest(user_id=user, edit_payload=encode_payload(edit.to_flat()))
    return dev.stub.ApplyEdit(req, timeout=10)


def test_histories_and_edits_survive_a_restart(bg, artifacts, cloud, tmp_path: Path) -> None:
    state = str(tmp_path / "state.sqlite")
    dev = _Device(bg, artifacts, cloud.port, state_path=state)
    try:
        for n in range(4):
            dev.event("fresh", f"i{n}", 100 + n)
        dev.event("u1", "i9", 10**9)  # a seeded user: its seed history becomes durable too
        got = dev.event("u2", "i3", 10**9, wait_for_edit=True)  # a cloud edit (prototype)
        assert got.outcome == pb.EDIT_OUTCOME_APPLIED and got.edit.prototype_id >= 1
        pushed = _push(dev, "fresh", 1)
        before = {u: (dev.status(u), dev.top(u)) for u in ("fresh", "u1", "u2")}
    finally:
        dev.stop()
    dev = _Device(bg, artifacts, cloud.port, state_path=state)
    try:
        for user, (status, top) in before.items():
            now = dev.status(user)
            assert now.history_length == status.history_length, user
            assert now.mode == status.mode and now.edit.edit_id == status.edit.edit_id, user
            assert (now.edit.prototype_id, now.edit.prototype_version) == (
                status.edit.prototype_id, status.edit.prototype_version)  # fmt: skip
            assert dev.top(user) == top, user  # same history, seen items and edit
        assert before["u2"][0].mode == pb.SERVING_MODE_EDITED
        again = _push(dev, "u1", 2)  # pushed edit ids keep rising after a restart
        assert again.edit.edit_id > pushed.edit.edit_id
    finally:
        dev.stop()


def test_lru_eviction_reloads_evicted_users(bg, artifacts, tmp_path: Path) -> None:
    dev = _Device(bg, artifacts, max_users=3, state_path=str(tmp_path / "s.sqlite"))
    try:
        engine = dev.handle.engine
        assert len(engine.users) == 3  # the 24 seeded users were cut to the cap
        for n in range(6):
            dev.event(f"n{n}", f"i{n}", n)
            dev.event(f"n{n}", f"i{n + 1}", n + 1)
        _push(dev, "n0", 3)
        top = dev.top("n0")
        for n in range(1, 6):
            dev.event(f"n{n}", "i20", 50)
        assert "n0" not in engine.users and len(engine.users) == 3
        status = dev.status("n0")  # reloaded from the state file
        assert status.history_length == 2 and status.mode == pb.SERVING_MODE_EDITED
        assert dev.top("n0") == top
        assert dev.status("u3").history_length > 0  # a seeded user evicted at start
        stats = bg.run(engine.status())["durability"]
        assert stats["evicted"] >= 1 and stats["reloaded"] >= 2 and stats["max_users"] == 3
    finally:
        dev.stop()


def test_without_state_an_evicted_user_is_forgotten(bg, artifacts) -> None:
    dev = _Device(bg, artifacts, max_users=2, seed_histories="none")
    try:
        for n in range(3):
            dev.event(f"m{n}", "i1", 1)
        with pytest.raises(grpc.RpcError) as err:
            dev.status("m0")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        dev.stop()


def test_compaction_keeps_one_snapshot_and_the_recent_events(bg, artifacts, tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    dev = _Device(bg, artifacts, history_len=5, seed_histories="none", state_path=str(path))
    try:
        for n in range(13):
            dev.event("c", f"i{n}", n)
    finally:
        dev.stop()
    with sqlite3.connect(path) as db:
        (rows,) = db.execute("SELECT count(*) FROM events WHERE user_id='c'").fetchone()
    assert rows <= 5
    stored = DeviceStateStore(path).load_user("c")
    assert stored is not None
    items = [i for i, _ in stored.history] + [i for _, i, _ in stored.events]
    assert items[-5:] == [f"i{n}" for n in range(8, 13)]
    assert set(stored.seen) | {i for _, i, _ in stored.events} == {f"i{n}" for n in range(13)}


def test_failed_state_write_is_unavailable_and_changes_nothing(
    bg, artifacts, tmp_path, monkeypatch
) -> None:
    dev = _Device(bg, artifacts, state_path=str(tmp_path / "s.sqlite"))
    try:
        dev.event("w", "i1", 1)
        before = dev.status("w").history_length

        def refuse(*args, **kwargs):
            raise StateWriteError("disk full")

        monkeypatch.setattr(dev.handle.engine.state, "record_event", refuse)
        with pytest.raises(grpc.RpcError) as err:
            dev.event("w", "i2", 2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dev.status("w").history_length == before
    finally:
        dev.stop()


def test_default_state_path_follows_the_port(tmp_path: Path) -> None:
    from argparse import Namespace

    from recsys.cli.serve_cmd import device_state_path

    def path(**kw) -> str | None:
        args = dict(no_state=False, state=None, port=50052, cache_dir=str(tmp_path))
        return device_state_path(Namespace(**{**args, **kw}))

    assert path() == str(tmp_path / "device-state" / "device-50052.sqlite")
    assert path(port=0) is None  # an ephemeral server: tests, replay, benchmarks
    assert path(no_state=True) is None
    assert path(port=0, state="x.sqlite") == "x.sqlite"


def test_push_that_cannot_be_stored_is_not_applied(bg, artifacts, tmp_path, monkeypatch) -> None:
    dev = _Device(bg, artifacts, state_path=str(tmp_path / "s.sqlite"))
    try:
        top = dev.top("u1")

        def refuse(*args, **kwargs):
            raise StateWriteError("disk full")

        monkeypatch.setattr(dev.handle.engine.state, "write_edit", refuse)
        with pytest.raises(grpc.RpcError) as err:
            _push(dev, "u1", 4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dev.status("u1").mode == pb.SERVING_MODE_BASE and dev.top("u1") == top
    finally:
        dev.stop()
