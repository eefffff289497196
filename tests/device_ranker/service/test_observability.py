"""Metrics and traces of the real device and cloud servers on loopback (issue 18).

Both servers run with ``metrics_port=0`` (an ephemeral /metrics endpoint each) and
tracing on with the SDK's in-memory exporter; the tests make calls over gRPC, scrape the
endpoints over HTTP, parse them with the Prometheus text parser and compare with what
was done; one edit request must make one trace whose spans are parent-linked from the
device's RequestEdit through the gRPC hop down to the store write.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import cloud_config, device_config

from device_ranker.service.server import DeviceHandle, start_device
from llm_cloud.service.server import CloudHandle, start_cloud
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving import tracing
from recsys.serving.server import ServerOptions

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

DEVICE = "recsys.device.v1.RecommendationService"
CLOUD = "recsys.cloud.v1.AdaptationService"
WITH_METRICS = ServerOptions(metrics_port=0)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter, service_name="recsys-test")
    yield exporter
    tracing.reset()


@pytest.fixture(scope="module")
def cloud(bg, spans, artifacts, tmp_path_factory) -> Iterator[CloudHandle]:
    store = tmp_path_factory.mktemp("obs-cloud") / "store.sqlite"
    handle = bg.run(start_cloud(cloud_config(artifacts, store, server=WITH_METRICS)))
    yield handle
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def device(bg, artifacts, cloud: CloudHandle) -> Iterator[DeviceHandle]:
    handle = bg.run(start_device(device_config(artifacts, cloud.port, server=WITH_METRICS)))
    yield handle
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def stub(device: DeviceHandle) -> Iterator[pb_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
        yield pb_grpc.RecommendationServiceStub(channel)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_the_servers_did(stub, device: DeviceHandle, cloud: CloudHandle) -> None:
    before_dev = scrape(device.server.metrics.port)
    before_cloud = scrape(cloud.server.metrics.port)
    user = "u3"
    for _ in range(4):
        assert len(stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=10).items) == 3
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb.RecommendRequest(user_id=user, k=0), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    edits = 2
    for _ in range(edits):
        reply = stub.RequestEdit(
            pb.RequestEditRequest(user_id=user, wait_for_edit=True), timeout=10
        )
        assert reply.outcome == pb.EDIT_OUTCOME_APPLIED
    assert cloud.writer is not None and cloud.writer.flush(10)

    dev = scrape(device.server.metrics.port)

    def delta(samples, before, name, **labels):
        return value(samples, name, **labels) - value(before, name, **labels)

    rec = dict(service=DEVICE, method="Recommend")
    assert delta(dev, before_dev, "recsys_rpc_requests_total", code="OK", **rec) == 4
    assert delta(dev, before_dev, "recsys_rpc_requests_total", code="INVALID_ARGUMENT", **rec) == 1
    assert delta(dev, before_dev, "recsys_rpc_duration_seconds_count", code="OK", **rec) == 4
    assert (
        delta(dev, before_dev, "recsys_rpc_requests_total", code="OK", service=DEVICE,
              method="RequestEdit") == edits
    )  # fmt: skip
    assert delta(dev, before_dev, "recsys_device_edits_total", outcome="requested") == edits
    assert delta(dev, before_dev, "recsys_device_edits_total", outcome="applied") == edits
    assert value(dev, "recsys_device_edits_total", outcome="failed") == device.engine.edits.failures
    answers = sum(
        delta(dev, before_dev, "recsys_device_answers_total", mode=m)
        for m in ("base", "edited", "fallback_last_edit", "fallback_base")
    )
    assert answers == 4
    assert value(dev, "recsys_device_cloud_reachable") == 1.0
    assert value(dev, "recsys_device_users") == len(device.engine.users)
    if hasattr(device.engine.store, "bytes_held"):  # the users' memory accounting
        assert value(dev, "recsys_device_users_memory_bytes") == device.engine.store.bytes_held > 0
    batcher = device.engine.batcher
    assert value(dev, "recsys_device_batch_size_count", batcher=batcher.name) == batcher.batches
    assert value(dev, "recsys_device_batch_size_sum", batcher=batcher.name) == batcher.items
    assert value(dev, "process_resident_memory_bytes") > 0

    cl = scrape(cloud.server.metrics.port)
    gen = dict(service=CLOUD, method="GenerateEdit", code="OK")
    assert delta(cl, before_cloud, "recsys_rpc_requests_total", **gen) == edits
    assert delta(cl, before_cloud, "recsys_cloud_edits_total") == edits
    cb = cloud.servicer.batcher
    assert value(cl, "recsys_cloud_batch_size_count", batcher=cb.name) == cb.batches
    stats = cloud.writer.stats()
    assert value(cl, "recsys_store_writer_ops_total", result="written") == stats["written"] > 0
    assert value(cl, "recsys_store_writer_queue_depth") == 0
    assert value(cl, "recsys_store_write_seconds_count") >= stats["batches"]


def test_one_edit_request_is_one_trace_across_the_grpc_hop(
    stub, device: DeviceHandle, cloud: CloudHandle, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    reply = stub.RequestEdit(pb.RequestEditRequest(user_id="u5", wait_for_edit=True), timeout=10)
    assert reply.outcome == pb.EDIT_OUTCOME_APPLIED
    assert cloud.writer is not None and cloud.writer.flush(10)
    finished = spans.get_finished_spans()
    root = next(s for s in finished if s.name == f"{DEVICE}/RequestEdit")
    assert root.kind == SpanKind.SERVER and root.parent is None
    trace = [s for s in finished if s.context.trace_id == root.context.trace_id]
    by_name = {s.name: s for s in trace}
    by_id = {s.context.span_id: s for s in trace}

    def parent(name: str) -> str:
        return by_id[by_name[name].parent.span_id].name

    client = next(
        s for s in trace if s.name == f"{CLOUD}/GenerateEdit" and s.kind == SpanKind.CLIENT
    )
    server = next(
        s for s in trace if s.name == f"{CLOUD}/GenerateEdit" and s.kind == SpanKind.SERVER
    )
    assert client.parent.span_id == root.context.span_id
    assert server.parent.span_id == client.context.span_id  # across the gRPC hop
    assert by_name["generate-edit"].parent.span_id == server.context.span_id  # the batch
    for step in ("cloud.tokens", "cloud.adaptor", "cloud.prototypes_payloads", "cloud.edit_log"):
        assert parent(step) == "generate-edit", step
    assert parent("store.write") in ("cloud.edit_log", "cloud.prototypes_payloads")
    assert parent("device.decode_edit") == f"{DEVICE}/RequestEdit"
    assert {s.resource.attributes["service.name"] for s in trace} == {"recsys-test"}
