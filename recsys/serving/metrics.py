"""Prometheus metrics of a gRPC server: per-RPC counts and latencies, plus collectors.

:class:`ServerMetrics` is one server's metrics: its own ``CollectorRegistry`` (two
servers in one process, as in the tests, never mix their figures), the process collector
(``process_resident_memory_bytes``, CPU seconds, open files) and the GC collector, and
:class:`RpcMetricsInterceptor`, a server interceptor that counts every unary call and
times it by service, method and final status code:

* ``recsys_rpc_requests_total{service, method, code}`` (counter);
* ``recsys_rpc_duration_seconds{service, method, code}`` (histogram, 0.5 ms .. 10 s).

Installed outermost, it sees the code the client gets (the authentication's
UNAUTHENTICATED, the error mapping's INVALID_ARGUMENT, ...). :meth:`ServerMetrics.serve`
exposes the registry at ``http://HOST:PORT/metrics`` from a daemon thread
(``prometheus_client.start_http_server``; port 0 = an ephemeral port), over HTTPS with the
server's certificate and key when the gRPC server has TLS.

A service adds its domain figures with :meth:`ServerMetrics.register`: a collector that
reads counters the engine keeps anyway at scrape time, so the hot paths carry no metric
code (:class:`CallbackCollector` turns a function returning metric families into one;
:func:`batch_size_family` turns a :class:`~recsys.serving.batching.MicroBatcher`'s size
counts into a histogram).

Example::

    metrics = ServerMetrics()
    server = grpc.aio.server(interceptors=[metrics.interceptor, ...])
    port = metrics.serve(0, "127.0.0.1")       # GET http://127.0.0.1:PORT/metrics
    metrics.register(CallbackCollector(lambda: [GaugeMetricFamily("x", "help", value=1)]))
    metrics.close()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
import grpc.aio
from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from recsys.errors import ValidationError
from recsys.serving.interceptor import UnaryInterceptor, unary_handler

logger = logging.getLogger(__name__)

# 0.5 ms .. 10 s: a Recommend is ~1 ms, a GenerateEdit with an LM tens to hundreds of ms
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def split_method(full: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or full


class RpcMetricsInterceptor(UnaryInterceptor):
    """Counts and times every unary-unary call by (service, method, status code).

    The code is the one the handler (and the interceptors inside this one) ended the call
    with: OK when it returned, the aborted code otherwise, CANCELLED when the client went
    away. Streaming handlers (health ``Watch``) pass through uncounted.
    """

    def __init__(self, requests: Counter, duration: Histogram) -> None:
        super().__init__()
        self.requests = requests
        self.duration = duration

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        service, name = split_method(method)
        children: dict[str, tuple[Any, Any]] = {}  # code -> (counter, histogram) of this method

        def child(code: str) -> tuple[Any, Any]:
            pair = children.get(code)
            if pair is None:
                labels = (service, name, code)
                pair = children[code] = (
                    self.requests.labels(*labels),
                    self.duration.labels(*labels),
                )
            return pair

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException:  # cancelled, or an exception no interceptor mapped
                code = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.UNKNOWN
                raise
            finally:
                if code is grpc.StatusCode.OK and context.code() not in (None, grpc.StatusCode.OK):
                    code = context.code()  # set_code without an abort
                count, latency = child(_code_name(code))
                count.inc()
                latency.observe(time.perf_counter() - t0)

        return unary_handler(timed, handler)


def _code_name(code: Any) -> str:
    if code is grpc.StatusCode.OK:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:  # grpc.aio may report the code as its integer value
        return next(c.name for c in grpc.StatusCode if c.value[0] == int(code))
    except (StopIteration, TypeError, ValueError):
        return "UNKNOWN"


class CallbackCollector(Collector):
    """A collector whose metric families come from ``fn()`` at each scrape (for
    figures an engine keeps anyway: its counters are read, nothing is added to its hot
    path). An exception in ``fn`` is logged and the scrape goes on without them."""

    def __init__(self, fn: Callable[[], Iterable[Metric]], name: str = "") -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", "collector")

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self.fn())
        except Exception:
            logger.exception("metrics collector %s failed", self.name)
            return []

    def describe(self) -> Iterable[Metric]:
        return []  # no duplicate-name check at registration: the families are dynamic


def batch_size_family(
    name: str, documentation: str, batchers: Mapping[str, Any], label: str = "batcher"
) -> HistogramMetricFamily:
    """A histogram family of the batch sizes each named batcher has run (from
    ``batcher.sizes``: size -> batches, kept by :class:`MicroBatcher` anyway)."""
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for key, batcher in batchers.items():
        sizes = dict(batcher.sizes)
        buckets, total = [], 0
        for bound in BATCH_BUCKETS:
            total = sum(n for size, n in sizes.items() if size <= bound)
            buckets.append((str(float(bound)), float(total)))
        buckets.append(("+Inf", float(sum(sizes.values()))))
        family.add_metric([key], buckets, float(sum(s * n for s, n in sizes.items())))
    return family


class ServerMetrics:
    """One server's registry, RPC interceptor and ``/metrics`` endpoint (module doc)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
        labels = ("service", "method", "code")
        self.requests = Counter(
            "recsys_rpc_requests",
            "gRPC calls answered, by service, method and status code",
            labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            "recsys_rpc_duration_seconds",
            "gRPC call latency in the server (handler and interceptors), seconds",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.interceptor = RpcMetricsInterceptor(self.requests, self.duration)
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def register(self, collector: Collector) -> None:
        """Add a collector (a service's domain figures) to this server's registry."""
        self.registry.register(collector)

    def serve(
        self,
        port: int,
        host: str = "127.0.0.1",
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> int:
        """Expose ``/metrics`` on ``host:port`` (0 = ephemeral), over HTTPS with
        ``certfile`` + ``keyfile`` (PEM; the gRPC server's own TLS pair); returns the bound
        port."""
        try:
            self._httpd, self._thread = start_http_server(
                port, addr=host, registry=self.registry, certfile=certfile, keyfile=keyfile
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValidationError(
                f"cannot serve metrics on {host}:{port}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        self.port = int(self._httpd.server_port)
        scheme = "https" if certfile else "http"
        logger.info("metrics on %s://%s:%d/metrics", scheme, host, self.port)
        return self.port

    def close(self) -> None:
        """Stop the HTTP endpoint (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


__all__ = [
    "CallbackCollector",
    "RpcMetricsInterceptor",
    "ServerMetrics",
    "batch_size_family",
    "split_method",
]
