"""OpenTelemetry traces across the services, off unless configured.

One edit request makes one trace: the device's server span (``RequestEdit`` or
``RecordEvent``), its client span of ``GenerateEdit`` (the W3C ``traceparent`` goes in
the gRPC metadata), the cloud's server span, the micro-batch's engine call, the LM's
tokens, the adaptor, the prototypes and payloads, and the store write (on the writer
thread, after the answer). Spans cross threads explicitly: a batch or a write op
remembers the context of each request it serves (:func:`current_context`); its span
(:func:`span_from`) is the child of the first one and links the others.

Nothing here imports OpenTelemetry until :func:`configure` is called (the ``tracing``
extra: ``opentelemetry-api`` and ``-sdk``); until then :func:`span` is a no-op context
manager, :func:`current_context` returns None and the interceptor lists are empty, so
an untraced server pays a flag check per hook.

The tracer provider is this module's own (not the process-global one), so tests can
configure, read an in-memory exporter and reset. Exporters: ``"console"`` (spans as JSON
on stdout, for a look), ``"otlp"`` (needs the ``opentelemetry-exporter-otlp-proto-grpc``
package, not installed by the project; endpoint from ``OTEL_EXPORTER_OTLP_ENDPOINT``), or
any ``SpanExporter`` instance (the tests use ``InMemorySpanExporter``).

Example::

    configure("console", service_name="recsys-device")     # before the servers start
    server = grpc.aio.server(interceptors=[*server_interceptors(), ...])
    channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors())
    with span("lm.tokens", batch=8):
        ...
    reset()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio

from recsys.errors import ValidationError
from recsys.serving.interceptor import UnaryInterceptor, unary_handler

logger = logging.getLogger(__name__)

EXPORTERS = ("off", "console", "otlp")

_state: dict[str, Any] = {"provider": None, "tracer": None, "propagator": None}


def enabled() -> bool:
    """Whether :func:`configure` installed a tracer."""
    return _state["tracer"] is not None


def _exporter(kind: str) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValidationError(
                "--trace otlp needs the OTLP exporter: pip install "
                "opentelemetry-exporter-otlp-proto-grpc (endpoint: OTEL_EXPORTER_OTLP_ENDPOINT)"
            ) from None
        return OTLPSpanExporter()
    raise ValidationError(f"unknown trace exporter {kind!r}; choose one of {list(EXPORTERS)}")


def configure(exporter: Any = "console", *, service_name: str = "recsys") -> None:
    """Turn tracing on for this process: ``exporter`` is ``"off"``, ``"console"``,
    ``"otlp"`` or a ``SpanExporter`` (spans are exported as each one ends)."""
    if isinstance(exporter, str) and exporter == "off":
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        raise ValidationError(
            "tracing needs OpenTelemetry: pip install 'recsys-llm-edit[tracing]' "
            "(opentelemetry-api, opentelemetry-sdk)"
        ) from None
    reset()
    span_exporter = _exporter(exporter) if isinstance(exporter, str) else exporter
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    # in-memory / console: export as each span ends; a network exporter: in the background
    processor = BatchSpanProcessor if exporter == "otlp" else SimpleSpanProcessor
    provider.add_span_processor(processor(span_exporter))
    _state.update(
        provider=provider,
        tracer=provider.get_tracer("recsys"),
        propagator=TraceContextTextMapPropagator(),
    )
    logger.info("tracing on (%s)", exporter if isinstance(exporter, str) else type(exporter))


def reset() -> None:
    """Turn tracing off again (flushes and shuts down the provider)."""
    provider = _state["provider"]
    _state.update(provider=None, tracer=None, propagator=None)
    if provider is not None:
        provider.shutdown()


def current_context() -> Any | None:
    """The OpenTelemetry context to hand to another thread (None when tracing is off)."""
    if not enabled():
        return None
    from opentelemetry import context

    return context.get_current()


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span, child of the current one (no-op when tracing is off); yields the span
    (None when off)."""
    tracer = _state["tracer"]
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=attributes) as s:
        yield s


@contextlib.contextmanager
def span_from(name: str, contexts: Sequence[Any], **attributes: Any) -> Iterator[Any]:
    """A span on another thread for work done on behalf of several requests: the child of
    the first non-None context of ``contexts`` (captured with :func:`current_context`),
    linked to the spans of the others. No-op when tracing is off or no context is given."""
    tracer = _state["tracer"]
    live = [c for c in contexts if c is not None]
    if tracer is None or not live:
        yield None
        return
    from opentelemetry import trace

    links = []
    for ctx in live[1:]:
        sc = trace.get_current_span(ctx).get_span_context()
        if sc.is_valid:
            links.append(trace.Link(sc))
    with tracer.start_as_current_span(
        name, context=live[0], links=links, attributes={**attributes, "requests": len(contexts)}
    ) as s:
        yield s


def traced(fn: Callable[[Any], Any], name: str, contexts: Sequence[Any]) -> Callable[[Any], Any]:
    """``fn`` wrapped to run inside :func:`span_from` (on whichever thread calls it)."""

    def call(arg: Any) -> Any:
        with span_from(name, contexts):
            return fn(arg)

    return call


# ---- gRPC ----------------------------------------------------------------------------------
def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class TracingServerInterceptor(UnaryInterceptor):
    """A server span per unary call, continuing the caller's trace from the metadata's
    ``traceparent``; the span records the aborted status code, if any."""

    def applies(self, method: str) -> bool:
        return enabled()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary

        async def traced_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            from opentelemetry.trace import SpanKind, Status, StatusCode

            carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            parent = _state["propagator"].extract(carrier)
            with _state["tracer"].start_as_current_span(
                method.lstrip("/"),
                context=parent,
                kind=SpanKind.SERVER,
                attributes=_rpc_attributes(method),
                record_exception=False,
                set_status_on_exception=False,
            ) as s:
                try:
                    return await behavior(request, context)
                except BaseException:
                    code = context.code()
                    s.set_attribute("rpc.grpc.status_code", str(getattr(code, "name", code)))
                    s.set_status(Status(StatusCode.ERROR, str(getattr(code, "name", code))))
                    raise

        return unary_handler(traced_call, handler)


class TracingClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """A client span per unary call, its context sent as ``traceparent`` metadata."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        if not enabled():
            return await continuation(client_call_details, request)
        from opentelemetry.trace import SpanKind, Status, StatusCode

        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else str(method)
        with _state["tracer"].start_as_current_span(
            method.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes=_rpc_attributes(method),
            record_exception=False,
            set_status_on_exception=False,
        ) as s:
            carrier: dict[str, str] = {}
            _state["propagator"].inject(carrier)
            metadata = grpc.aio.Metadata(*tuple(client_call_details.metadata or ()))
            for key, value in carrier.items():
                metadata.add(key, value)
            details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
            call = await continuation(details, request)
            try:
                await call  # the span covers the whole call
            except grpc.aio.AioRpcError as exc:
                s.set_attribute("rpc.grpc.status_code", exc.code().name)
                s.set_status(Status(StatusCode.ERROR, exc.code().name))
            return call


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """``[TracingServerInterceptor()]`` when tracing is on, else ``[]``."""
    return [TracingServerInterceptor()] if enabled() else []


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """``[TracingClientInterceptor()]`` when tracing is on, else ``[]``."""
    return [TracingClientInterceptor()] if enabled() else []


__all__ = [
    "EXPORTERS",
    "client_interceptors",
    "configure",
    "current_context",
    "enabled",
    "reset",
    "server_interceptors",
    "span",
    "span_from",
    "traced",
]
