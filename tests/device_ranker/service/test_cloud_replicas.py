"""A device linked to two cloud replicas (issue 17 item 4), in this process on loopback.

The address list becomes a static ``ipv4:`` target; the device's one channel spreads
GenerateEdit over both replicas (round_robin), skips a replica whose health is
NOT_SERVING (client-side health checking) and keeps answering from the other when one
stops. The process-level failover on one PostgreSQL store is tests/test_cloud_failover.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from service_helpers import cloud_config, device_config

from device_ranker.service.config import CloudLinkConfig
from device_ranker.service.server import DeviceHandle, start_device
from llm_cloud.service.server import CloudHandle, start_cloud
from recsys.errors import ValidationError
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.server import channel_target


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("cloud.internal:50051", "cloud.internal:50051"),
        ("dns:///cloud.internal:50051", "dns:///cloud.internal:50051"),
        ("127.0.0.1:1,127.0.0.2:2", "ipv4:127.0.0.1:1,127.0.0.2:2"),
        ("localhost:1, localhost:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
    ],
)
def test_channel_target(given: str, target: str) -> None:
    assert channel_target(given) == target


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "empty"),
        ("127.0.0.1:1,", "bad address"),
        ("127.0.0.1:1,127.0.0.1:99999", "bad address"),
        ("a.example:1,b.example:1", "not an IP address"),
        ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
    ],
)
def test_channel_target_rejects(given: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        channel_target(given)


def test_cloud_link_rejects_bad_list_at_start() -> None:
    from device_ranker.service.cloud_link import CloudLink

    with pytest.raises(ValidationError, match="not an IP address"):
        CloudLink(CloudLinkConfig(target="a.example:1,b.example:2"))


@pytest.fixture(scope="module")
def replicas(bg, artifacts, tmp_path_factory) -> Iterator[list[CloudHandle]]:
    """Two tiny cloud replicas (no store: the store is the failover test's subject)."""
    handles = [bg.run(start_cloud(cloud_config(artifacts))) for _ in range(2)]
    yield handles
    for h in handles:
        bg.run(h.stop(0))


@pytest.fixture(scope="module")
def linked_device(bg, artifacts, replicas: list[CloudHandle]) -> Iterator[DeviceHandle]:
    cfg = device_config(artifacts)
    target = ",".join(f"127.0.0.1:{h.port}" for h in replicas)
    cfg = type(cfg)(**{**cfg.__dict__, "cloud": CloudLinkConfig(
        target=target, deadline_s=2.0, probe_interval_s=0.2)})  # fmt: skip
    handle = bg.run(start_device(cfg))
    yield handle
    bg.run(handle.stop(0))


def _events(stub: pb_grpc.RecommendationServiceStub, n: int, start: int) -> list[int]:
    """``n`` RecordEvents that each ask the cloud (gate threshold 0, budget 1); outcomes."""
    out = []
    for k in range(n):
        ev = stub.RecordEvent(
            pb.RecordEventRequest(user_id=f"u{k % 6}", item_id=f"i{(start + k) % 30}",
                                  timestamp=10**6 + start + k, wait_for_edit=True),
            timeout=10,
        )  # fmt: skip
        out.append(ev.outcome)
    return out


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_round_robin_health_and_failover(
    bg, replicas: list[CloudHandle], linked_device: DeviceHandle, tmp_path: Path
) -> None:
    a, b = replicas
    with grpc.insecure_channel(f"127.0.0.1:{linked_device.port}") as ch:
        stub = pb_grpc.RecommendationServiceStub(ch)
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
        assert status.cloud_reachable and "," in status.cloud_target
        # 1. both healthy: the calls are spread over both replicas
        before = (a.engine.requests, b.engine.requests)
        outcomes = _events(stub, 12, 0)
        assert set(outcomes) == {pb.EDIT_OUTCOME_APPLIED}
        got = (a.engine.requests - before[0], b.engine.requests - before[1])
        assert sum(got) == 12 and min(got) >= 3, got  # round_robin: about half each

        # 2. replica a reports NOT_SERVING: it gets no calls, none fails
        bg.run(a.server.set_serving(False))
        time.sleep(0.5)  # the health Watch stream reports the change
        before = (a.engine.requests, b.engine.requests)
        assert set(_events(stub, 8, 100)) == {pb.EDIT_OUTCOME_APPLIED}
        assert (a.engine.requests - before[0], b.engine.requests - before[1]) == (0, 8)

        # 3. a healthy again, b stops: every call goes to a, and the device stays reachable
        bg.run(a.server.set_serving(True))
        bg.run(b.stop(0))
        _wait(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=5).cloud_reachable)
        time.sleep(0.5)
        before = a.engine.requests
        assert set(_events(stub, 6, 200)) == {pb.EDIT_OUTCOME_APPLIED}
        assert a.engine.requests - before == 6
