"""Health, reflection, graceful shutdown, deadlines, cloud outages, signed token and TLS."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from service_helpers import cloud_config, device_config, self_signed_cert

from device_ranker.service.config import CloudLinkConfig
from device_ranker.service.server import start_device
from device_ranker.service.servicer import SERVICE_NAME, RecommendationServicer
from llm_cloud.service.server import load_engine, start_cloud
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.auth import AuthConfig, issue_token, token_metadata
from recsys.serving.errors import ErrorMappingInterceptor
from recsys.serving.keys import generate_key, write_key
from recsys.serving.server import GrpcServer, ServerOptions


def health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_not_serving_until_loaded_then_reflection(bg, artifacts) -> None:
    server = GrpcServer(ServerOptions(), [ErrorMappingInterceptor("device")])
    servicer = RecommendationServicer()
    server.add(
        lambda s: pb_grpc.add_RecommendationServiceServicer_to_server(servicer, s), SERVICE_NAME
    )
    port = bg.run(server.start())
    try:
        assert health(port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health(port, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.RecommendationServiceStub(channel).Recommend(
                    pb.RecommendRequest(user_id="u1", k=3), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
        bg.run(server.set_serving(True))
        assert health(port) == health_pb2.HealthCheckResponse.SERVING
    finally:
        bg.run(server.stop(0))


def test_graceful_stop_finishes_in_flight_calls(bg, artifacts, monkeypatch) -> None:
    handle = bg.run(start_device(device_config(artifacts)))
    slow = handle.engine.ranking.rank_batch

    def slow_batch(jobs):
        time.sleep(0.8)
        return slow(jobs)

    monkeypatch.setattr(handle.engine.batcher, "fn", slow_batch)
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        future = stub.Recommend.future(pb.RecommendRequest(user_id="u1", k=3), timeout=10)
        time.sleep(0.3)  # the call is in flight
        stopping = asyncio.run_coroutine_threadsafe(handle.stop(grace=5), bg.loop)
        reply = future.result()  # finishes despite the stop
        assert len(reply.items) == 3
        stopping.result(10)
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(pb.RecommendRequest(user_id="u1", k=3), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


class SlowEngine:
    """A tiny engine whose GenerateEdit takes ``delay`` seconds."""

    def __init__(self, engine, delay: float) -> None:
        self._engine, self.delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate_edits(self, requests):
        time.sleep(self.delay)
        return self._engine.generate_edits(requests)


def test_slow_cloud_deadline_falls_back(bg, artifacts) -> None:
    cfg = cloud_config(artifacts)
    cloud = bg.run(start_cloud(cfg, engine=SlowEngine(load_engine(cfg), 1.5)))
    dev_cfg = device_config(
        artifacts,
        cloud=CloudLinkConfig(
            target=f"127.0.0.1:{cloud.port}", deadline_s=0.3, probe_interval_s=0.2
        ),
    )
    device = bg.run(start_device(dev_cfg))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            t0 = time.perf_counter()
            reply = stub.RecordEvent(
                pb.RecordEventRequest(user_id="u1", item_id="i3", timestamp=1, wait_for_edit=True),
                timeout=10,
            )
            assert time.perf_counter() - t0 < 1.2  # the device did not wait for the cloud
            assert reply.outcome == pb.EDIT_OUTCOME_FAILED
            assert reply.mode == pb.SERVING_MODE_FALLBACK_BASE
            rec = stub.Recommend(pb.RecommendRequest(user_id="u1", k=3), timeout=5)
            assert rec.fallback and len(rec.items) == 3
            assert "DEADLINE_EXCEEDED" in rec.note
            status = stub.GetStatus(pb.GetStatusRequest(user_id="u1"), timeout=5)
            assert status.edit_failures == 1 and status.user.mode == pb.SERVING_MODE_FALLBACK_BASE
    finally:
        bg.run(device.stop(0))
        bg.run(cloud.stop(0))


def test_unreachable_cloud_serves_base_and_says_so(bg, artifacts, caplog) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    device = bg.run(start_device(device_config(artifacts, cloud_port=port)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            status = stub.GetStatus(pb.GetStatusRequest(), timeout=5)
            assert status.ready and not status.cloud_reachable
            rec = stub.Recommend(pb.RecommendRequest(user_id="u2", k=4), timeout=5)
            assert len(rec.items) == 4
            assert rec.fallback and rec.mode == pb.SERVING_MODE_FALLBACK_BASE
            assert "unreachable" in rec.note
            ev = stub.RecordEvent(
                pb.RecordEventRequest(user_id="u2", item_id="i5", timestamp=1, wait_for_edit=True),
                timeout=5,
            )
            assert ev.outcome == pb.EDIT_OUTCOME_FAILED
        assert any("unreachable" in r.getMessage() for r in caplog.records)
    finally:
        bg.run(device.stop(0))


def test_token_and_tls_on_the_cloud_link(bg, artifacts, tmp_path: Path) -> None:
    cert, key_pem = self_signed_cert(tmp_path)
    key = generate_key("k1")
    write_key(key, tmp_path / "k1.key")
    token = tmp_path / "token"
    token.write_text(issue_token(key, "edge", role="operator") + "\n")
    wrong = tmp_path / "wrong"
    wrong.write_text(issue_token(generate_key("k1"), "edge", role="operator") + "\n")
    cfg = cloud_config(artifacts, auth=AuthConfig(keys=(str(tmp_path / "k1.key"),)),
                       server=ServerOptions(tls_cert=str(cert), tls_key=str(key_pem)))  # fmt: skip
    cloud = bg.run(start_cloud(cfg))
    target = f"127.0.0.1:{cloud.port}"
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(target, creds) as channel:
            stub = cpb_grpc.AdaptationServiceStub(channel)
            request = cpb.GenerateEditRequest(device_id="d", recent_item_ids=["i1", "i2"])
            for metadata, words in (
                ((), "missing"),
                ((("authorization", "Bearer not-it"),), "malformed"),
                (token_metadata(wrong.read_text().strip()), "signature"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ListPrototypes(cpb.ListPrototypesRequest(), timeout=5, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert words in err.value.details()
            reply = stub.GenerateEdit(
                request, timeout=10, metadata=token_metadata(token.read_text().strip())
            )
            assert reply.edit_payload
            health = health_pb2_grpc.HealthStub(channel).Check(  # open without a token
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(target) as channel:  # plaintext to a TLS server fails
            with pytest.raises(grpc.RpcError) as err:
                cpb_grpc.AdaptationServiceStub(channel).ListPrototypes(
                    cpb.ListPrototypesRequest(), timeout=3
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        for token_file, outcome in (
            (token, pb.EDIT_OUTCOME_APPLIED),
            (wrong, pb.EDIT_OUTCOME_FAILED),
        ):
            dev_cfg = device_config(
                artifacts,
                cloud=CloudLinkConfig(target=target, tls_ca=str(cert), token_file=str(token_file),
                                      deadline_s=5.0, probe_interval_s=0.2),
            )  # fmt: skip
            device = bg.run(start_device(dev_cfg))
            try:
                with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
                    ev = pb_grpc.RecommendationServiceStub(channel).RecordEvent(
                        pb.RecordEventRequest(
                            user_id="u3", item_id="i7", timestamp=1, wait_for_edit=True
                        ),
                        timeout=10,
                    )
                assert ev.outcome == outcome
            finally:
                bg.run(device.stop(0))
    finally:
        bg.run(cloud.stop(0))


def test_message_size_limit(bg, artifacts) -> None:
    cfg = device_config(artifacts, server=ServerOptions(max_message_bytes=4096))
    device = bg.run(start_device(cfg))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            big = pb.RecommendRequest(
                user_id="u1", k=3, candidates=pb.CandidateSet(item_ids=["i1" * 50] * 100)
            )
            with pytest.raises(grpc.RpcError) as err:
                stub.Recommend(big, timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(stub.Recommend(pb.RecommendRequest(user_id="u1", k=3), timeout=5).items) == 3
    finally:
        bg.run(device.stop(0))
