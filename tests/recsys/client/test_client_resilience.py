"""Deadlines, retries and TLS of the client, against real loopback servers: a scripted
RecommendationService (slow Recommend, GetStatus answering UNAVAILABLE a given number of
times) in a :class:`recsys.serving.server.GrpcServer`, and a real device server started
only after the client has begun calling."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from service_helpers import device_config, self_signed_cert

from device_ranker.service.server import start_device
from recsys.client import (
    AsyncDeviceClient,
    ClientOptions,
    DeadlineExceededError,
    DeviceClient,
    RetryPolicy,
    UnavailableError,
)
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.server import GrpcServer, ServerOptions

FAST_RETRY = RetryPolicy(attempts=40, initial_backoff_s=0.05, max_backoff_s=0.5, jitter_s=0.05)


@dataclass
class Scripted(pb_grpc.RecommendationServiceServicer):
    """Recommend sleeps ``delay_s``; GetStatus answers UNAVAILABLE ``unavailable`` times."""

    delay_s: float = 0.0
    unavailable: int = 0
    calls: dict[str, int] = field(default_factory=lambda: {"Recommend": 0, "GetStatus": 0})

    async def Recommend(self, request, context):
        self.calls["Recommend"] += 1
        await asyncio.sleep(self.delay_s)
        return pb.RecommendResponse(items=[pb.ScoredItem(item_id="i1", score=1.0)])

    async def GetStatus(self, request, context):
        self.calls["GetStatus"] += 1
        if self.unavailable > 0:
            self.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model still loading")
        return pb.GetStatusResponse(ready=True, num_items=7)


@pytest.fixture
def scripted(bg, request) -> Iterator[tuple[Scripted, int]]:
    servicer = Scripted()
    options = getattr(request, "param", None) or ServerOptions(port=0)
    server = GrpcServer(options)
    server.add(
        lambda s: pb_grpc.add_RecommendationServiceServicer_to_server(servicer, s),
        "recsys.device.v1.RecommendationService",
    )
    port = bg.run(server.start())
    yield servicer, port
    bg.run(server.stop(0))


def test_unavailable_is_retried_with_backoff(scripted, caplog) -> None:
    servicer, port = scripted
    servicer.unavailable = 3
    caplog.set_level(logging.INFO, logger="recsys.client.transport")
    with DeviceClient(f"127.0.0.1:{port}", ClientOptions(timeout_s=5, retry=FAST_RETRY)) as c:
        status = c.status()
    assert status.ready and status.num_items == 7
    assert servicer.calls["GetStatus"] == 4
    assert sum("answered UNAVAILABLE" in r.message for r in caplog.records) == 3


def test_retries_stop_after_the_attempts_with_a_clear_error(scripted) -> None:
    servicer, port = scripted
    servicer.unavailable = 10
    retry = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02, jitter_s=0)
    with (
        DeviceClient(f"127.0.0.1:{port}", ClientOptions(timeout_s=5, retry=retry)) as c,
        pytest.raises(UnavailableError) as err,
    ):
        c.status()
    assert err.value.attempts == 3 and servicer.calls["GetStatus"] == 3
    assert "after 3 attempts" in str(err.value) and "model still loading" in str(err.value)
    assert isinstance(err.value, ConnectionError)


def test_deadline_exceeded_is_a_clear_exception_and_not_retried(scripted) -> None:
    servicer, port = scripted
    servicer.delay_s = 2.0
    with DeviceClient(f"127.0.0.1:{port}", ClientOptions(timeout_s=0.3, retry=FAST_RETRY)) as c:
        with pytest.raises(DeadlineExceededError) as err:
            c.recommend("u1", k=1)
        assert err.value.attempts == 1 and servicer.calls["Recommend"] == 1
        assert err.value.method == "Recommend" and isinstance(err.value, TimeoutError)
        assert "DEADLINE_EXCEEDED" in str(err.value)
        servicer.delay_s = 0.0
        assert c.recommend("u1", k=1, timeout_s=5).item_ids == ["i1"]  # per-call deadline

    async def run() -> None:
        servicer.delay_s = 2.0
        async with AsyncDeviceClient(f"127.0.0.1:{port}", ClientOptions(timeout_s=0.3)) as c:
            with pytest.raises(DeadlineExceededError):
                await c.recommend("u1", k=1)

    asyncio.run(run())


def test_no_server_at_all_is_unavailable_after_the_budget() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    retry = RetryPolicy(attempts=100, initial_backoff_s=0.05, max_backoff_s=0.1, budget_s=0.5)
    with (
        DeviceClient(f"127.0.0.1:{port}", ClientOptions(timeout_s=1, retry=retry)) as c,
        pytest.raises(UnavailableError) as err,
    ):
        c.status()
    assert 1 < err.value.attempts < 100


def test_a_device_started_after_the_client_begins_is_reached(bg, artifacts) -> None:
    """The client calls a port where nothing listens yet; the device server binds it
    ~1 s later and answers UNAVAILABLE while its model loads; the call succeeds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = device_config(artifacts, server=ServerOptions(port=port))
    handles = []
    starter = threading.Timer(1.0, lambda: handles.append(bg.run(start_device(cfg), timeout=120)))
    starter.start()
    try:
        # up to ~2 minutes of retries: a loaded CI machine may take long to load the model
        patient = RetryPolicy(
            attempts=300, initial_backoff_s=0.05, max_backoff_s=0.5, jitter_s=0.05
        )
        with DeviceClient(f"127.0.0.1:{port}", ClientOptions(timeout_s=5, retry=patient)) as c:
            status = c.status()
            assert status.ready and status.num_items == 30
            assert c.record_event("late-user", "i2", timestamp=1).new_user
    finally:
        starter.join()
        for h in handles:
            bg.run(h.stop(0))


def test_tls_with_the_server_certificate(bg, tmp_path) -> None:
    cert, key = self_signed_cert(tmp_path)
    servicer = Scripted()
    server = GrpcServer(ServerOptions(port=0, tls_cert=str(cert), tls_key=str(key)))
    server.add(
        lambda s: pb_grpc.add_RecommendationServiceServicer_to_server(servicer, s),
        "recsys.device.v1.RecommendationService",
    )
    port = bg.run(server.start())
    try:
        opts = ClientOptions(timeout_s=5, tls_ca=str(cert), tls_server_name="localhost")
        with DeviceClient(f"127.0.0.1:{port}", opts) as c:
            assert c.recommend("u1", k=1).item_ids == ["i1"]
        retry = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01, jitter_s=0)
        with (
            DeviceClient(f"127.0.0.1:{port}", ClientOptions(timeout_s=5, retry=retry)) as plain,
            pytest.raises(UnavailableError),
        ):  # plaintext to a TLS port: no handshake
            plain.recommend("u1", k=1)
    finally:
        bg.run(server.stop(0))
