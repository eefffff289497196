"""Crash durability of the device server (issue 16, item 3): the REAL server process is
SIGKILLed under RecordEvent traffic from several client threads, restarted on the same
state file, and every acknowledged event is there (in order, in the file and in the
served history), and the users that had an edit are still served it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from device_ranker.service.state import DeviceStateStore
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.process import ServerProcess

pytestmark = pytest.mark.slow

SENDERS = 3
EDITED = ("e0", "e1", "e2")


def _device(artifacts, cloud_port: int, state: Path, log: Path) -> ServerProcess:
    ds_dir, ckpt = artifacts
    argv = ["serve", "device", "--checkpoint", str(ckpt), "--dataset", str(ds_dir),
            "--cloud", f"127.0.0.1:{cloud_port}", "--cloud-deadline", "3",
            "--probe-interval", "0.2", "--gate-budget", "0", "--state", str(state)]  # fmt: skip
    return ServerProcess(argv, name="device", log_path=log).start()


def _send(target: str, user: str, acked: list[str], stop: threading.Event) -> None:
    """RecordEvents for ``user`` until the server dies; acknowledged items in ``acked``."""
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommendationServiceStub(ch)
        n = 0
        while not stop.is_set():
            item = f"i{n % 30}"
            try:
                stub.RecordEvent(
                    pb.RecordEventRequest(user_id=user, item_id=item, timestamp=1000 + n),
                    timeout=5,
                )
            except grpc.RpcError:
                return  # the server is gone: this event was not acknowledged
            acked.append(item)
            n += 1


def test_sigkill_under_traffic_loses_no_acknowledged_event(bg, artifacts, cloud, tmp_path) -> None:
    state = tmp_path / "device-state.sqlite"
    dev = _device(artifacts, cloud.port, state, tmp_path / "device-1.log")
    try:
        dev.wait_ready(timeout=120)
        with grpc.insecure_channel(dev.target) as ch:
            stub = pb_grpc.RecommendationServiceStub(ch)
            edits = {}
            for user in EDITED:  # a few users with a cloud edit (prototype + residual)
                stub.RecordEvent(pb.RecordEventRequest(user_id=user, item_id="i3", timestamp=1))
                got = stub.RequestEdit(pb.RequestEditRequest(user_id=user, wait_for_edit=True))
                assert got.outcome == pb.EDIT_OUTCOME_APPLIED, got
                edits[user] = (got.edit.edit_id, got.edit.prototype_id, got.edit.prototype_version)
            tops = {u: [it.item_id for it in stub.Recommend(
                pb.RecommendRequest(user_id=u, k=5), timeout=5).items] for u in EDITED}  # fmt: skip
        acked: dict[str, list[str]] = {f"k{s}": [] for s in range(SENDERS)}
        stop = threading.Event()
        threads = [threading.Thread(target=_send, args=(dev.target, u, acked[u], stop))
                   for u in acked]  # fmt: skip
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while min(len(a) for a in acked.values()) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        dev.kill()  # SIGKILL, mid-traffic
        stop.set()
        for t in threads:
            t.join(10)
        assert all(len(a) >= 30 for a in acked.values()), {u: len(a) for u, a in acked.items()}
    finally:
        dev.close()

    stored = DeviceStateStore(state)  # the file as the killed process left it
    for user, items in acked.items():
        rec = stored.load_user(user)
        assert rec is not None
        kept = [i for i, _ in rec.history] + [i for _, i, _ in rec.events]
        # every acknowledged event, in order; at most one more per sender (committed,
        # then killed before the answer went out)
        assert kept[: len(items)] == items and len(kept) - len(items) <= 1, user
    stored.close()

    dev = _device(artifacts, cloud.port, state, tmp_path / "device-2.log")
    try:
        dev.wait_ready(timeout=120)
        with grpc.insecure_channel(dev.target) as ch:
            stub = pb_grpc.RecommendationServiceStub(ch)
            for user, items in acked.items():
                got = stub.GetStatus(pb.GetStatusRequest(user_id=user), timeout=5).user
                assert len(items) <= got.history_length <= len(items) + 1, user
            for user, (edit_id, pid, pver) in edits.items():
                got = stub.GetStatus(pb.GetStatusRequest(user_id=user), timeout=5).user
                assert got.mode == pb.SERVING_MODE_EDITED, user
                assert (got.edit.edit_id, got.edit.prototype_id,
                        got.edit.prototype_version) == (edit_id, pid, pver)  # fmt: skip
                rec = stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=5)
                assert rec.mode == pb.SERVING_MODE_EDITED
                assert [it.item_id for it in rec.items] == tops[user]
    finally:
        dev.stop()
        dev.close()
