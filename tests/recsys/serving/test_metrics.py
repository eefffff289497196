"""recsys.serving.metrics: a real gRPC server on loopback with ``metrics_port=0``; calls
are counted and timed by method and status code, the endpoint is scraped over HTTP and
parsed with the Prometheus text parser; batch sizes come from a real MicroBatcher."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from recsys.errors import ValidationError
from recsys.serving.batching import BatchConfig, MicroBatcher
from recsys.serving.metrics import CallbackCollector, ServerMetrics, batch_size_family
from recsys.serving.server import GrpcServer, ServerOptions

HEALTH = "grpc.health.v1.Health"


def scrape(port: int) -> dict:
    """(sample name, sorted labels) -> value of GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**kw: str) -> tuple:
    return tuple(sorted(kw.items()))


def test_calls_are_counted_by_method_and_code(bg) -> None:
    server = GrpcServer(ServerOptions(metrics_port=0))
    port = bg.run(server.start())
    bg.run(server.set_serving(True))
    assert server.metrics is not None and server.metrics.port
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(3):
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
        m = scrape(server.metrics.port)
        ok = labels(service=HEALTH, method="Check", code="OK")
        missing = labels(service=HEALTH, method="Check", code="NOT_FOUND")
        assert m[("recsys_rpc_requests_total", ok)] == 3
        assert m[("recsys_rpc_requests_total", missing)] == 2
        assert m[("recsys_rpc_duration_seconds_count", ok)] == 3
        buckets = sorted(
            (float(dict(k[1])["le"]), v)
            for k, v in m.items()
            if k[0] == "recsys_rpc_duration_seconds_bucket" and dict(k[1])["code"] == "OK"
        )
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == 3  # cumulative, +Inf = all
        assert m[("process_resident_memory_bytes", ())] > 0
    finally:
        bg.run(server.stop(0))
    with pytest.raises(urllib.error.URLError):  # the endpoint stops with the server
        scrape(server.metrics.port)


def test_no_metrics_port_no_endpoint() -> None:
    assert GrpcServer(ServerOptions()).metrics is None
    with pytest.raises(ValidationError, match="metrics_port"):
        ServerOptions(metrics_port=70000)


def test_a_taken_port_is_a_clear_error() -> None:
    first = ServerMetrics()
    port = first.serve(0)
    try:
        with pytest.raises(ValidationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            ServerMetrics().serve(port)
    finally:
        first.close()


def test_batch_sizes_of_a_real_batcher(bg) -> None:
    batcher = MicroBatcher(lambda items: [x * 2 for x in items], BatchConfig(max_batch=4,
                           max_wait_ms=50.0), name="double")  # fmt: skip

    async def load() -> None:
        await asyncio.gather(*(batcher.submit(i) for i in range(10)))  # 4 + 4 + 2
        await batcher.submit(99)  # alone

    bg.run(load())
    bg.run(batcher.close())
    family = batch_size_family("x_batch_size", "sizes", {"double": batcher})
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("x_batch_size_count", None)] == batcher.batches == sum(batcher.sizes.values())
    assert got[("x_batch_size_sum", None)] == batcher.items == 11
    for bound in (1, 2, 4, 8):
        want = sum(n for size, n in batcher.sizes.items() if size <= bound)
        assert got[("x_batch_size_bucket", str(float(bound)))] == want


def test_a_failing_collector_does_not_break_the_scrape() -> None:
    metrics = ServerMetrics()

    def broken():
        raise RuntimeError("engine gone")

    metrics.register(CallbackCollector(broken, "broken"))
    metrics.register(CallbackCollector(lambda: [GaugeMetricFamily("x_up", "up", value=1)]))
    port = metrics.serve(0)
    try:
        assert scrape(port)[("x_up", ())] == 1
    finally:
        metrics.close()
