"""recsys.serving.tracing without the services: off by default (no-op, no OpenTelemetry
needed), and spans that cross threads keep their parent and link the other requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from recsys.errors import ValidationError
from recsys.serving import tracing

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter, service_name="unit")
    yield exporter
    tracing.reset()


def test_off_by_default_is_a_no_op() -> None:
    assert not tracing.enabled()
    with tracing.span("x") as s:
        assert s is None
    assert tracing.current_context() is None
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    with tracing.span_from("y", [None, None]) as s:
        assert s is None
    tracing.configure("off")
    assert not tracing.enabled()


def test_otlp_without_its_package_is_a_clear_error() -> None:
    pytest.importorskip("opentelemetry.sdk")
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        with pytest.raises(ValidationError, match="opentelemetry-exporter-otlp-proto-grpc"):
            tracing.configure("otlp")
        assert not tracing.enabled()
    else:
        pytest.skip("the OTLP exporter is installed")


def test_batch_span_on_another_thread_is_the_first_requests_child(spans) -> None:
    contexts = []
    for name in ("request-a", "request-b"):
        with tracing.span(name):
            contexts.append(tracing.current_context())

    def work(items):
        with tracing.span("inner"):
            return list(items)

    out = []
    thread = threading.Thread(
        target=lambda: out.append(tracing.traced(work, "batch", contexts)([1]))
    )
    thread.start()
    thread.join()
    assert out == [[1]]
    done = {s.name: s for s in spans.get_finished_spans()}
    a, b, batch, inner = done["request-a"], done["request-b"], done["batch"], done["inner"]
    assert batch.parent.span_id == a.context.span_id
    assert batch.context.trace_id == a.context.trace_id != b.context.trace_id
    assert [link.context.span_id for link in batch.links] == [b.context.span_id]
    assert inner.parent.span_id == batch.context.span_id
    assert batch.attributes["requests"] == 2
