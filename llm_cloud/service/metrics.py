"""The cloud's Prometheus figures, read from counters the servicer and engine keep anyway.

:func:`cloud_collector` returns a collector for the server's registry
(:class:`recsys.serving.metrics.ServerMetrics`); at each scrape it reads:

* ``recsys_cloud_edits_total``: edit requests the engine served (``engine.requests``),
  ``recsys_cloud_engine_calls_total``: engine calls (one per micro-batch);
* ``recsys_cloud_batch_size``: histogram of the GenerateEdit micro-batches' sizes,
  ``recsys_cloud_batch_queue_depth``: calls waiting for a batch,
  ``recsys_cloud_batch_dropped_total``: calls whose caller went away while queued;
* ``recsys_cloud_prototypes``: live prototypes of the bank;
* with a fleet guard (``--fleet-guard``): ``recsys_cloud_fleet_guard_decisions_total
  {decision=apply|hold}``, ``recsys_cloud_fleet_guard_clicks`` / ``_devices`` (the pooled
  evidence) and ``recsys_cloud_fleet_guard_mean_gain_diff``;
* with a write-behind store writer (:class:`codebook.store.writer.StoreWriter`):
  ``recsys_store_write_seconds`` (histogram of one transaction with its retries),
  ``recsys_store_writer_queue_depth`` / ``_queue_size``, ``recsys_store_writer_ops_total
  {result=written|failed|dropped}``, ``recsys_store_writer_retries_total``,
  ``recsys_store_writer_rows_total``.

Per-RPC counts and latencies come from the server's interceptor, the process memory
from the process collector (both in :mod:`recsys.serving.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from recsys.serving.metrics import CallbackCollector, batch_size_family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def cloud_families(servicer: Any, engine: Any) -> Iterator[Metric]:
    """The cloud's metric families now (see the module docstring)."""
    yield _counter("recsys_cloud_edits", "edit requests the engine served",
                   getattr(engine, "requests", 0))  # fmt: skip
    yield _counter("recsys_cloud_engine_calls", "engine calls (one per micro-batch)",
                   getattr(engine, "calls", 0))  # fmt: skip
    batcher = servicer.batcher
    if batcher is not None:
        yield batch_size_family(
            "recsys_cloud_batch_size", "GenerateEdit calls per engine call", {batcher.name: batcher}
        )
        yield _gauge("recsys_cloud_batch_queue_depth", "GenerateEdit calls waiting for a batch",
                     batcher.queued())  # fmt: skip
        yield _counter("recsys_cloud_batch_dropped",
                       "GenerateEdit calls dropped before the engine ran (caller gone)",
                       batcher.dropped)  # fmt: skip
    fleet = getattr(servicer, "fleet", None)
    if fleet is not None:
        yield from fleet_families(fleet)
    bank = getattr(engine, "bank", None)
    if bank is not None:
        yield _gauge("recsys_cloud_prototypes", "live prototypes in the bank", len(bank.live))
    writer = getattr(engine, "writer", None)
    if writer is not None:
        yield from writer_families(writer)


def fleet_families(fleet: Any) -> Iterator[Metric]:
    """The fleet guard's decisions and pooled evidence."""
    fam = CounterMetricFamily(
        "recsys_cloud_fleet_guard_decisions", "fleet guard decisions", labels=["decision"]
    )
    for decision, count in fleet.decisions.items():
        fam.add_metric([decision], count)
    yield fam
    yield _gauge("recsys_cloud_fleet_guard_clicks", "pooled guard clicks", fleet.n)
    yield _gauge("recsys_cloud_fleet_guard_devices", "devices with guard evidence", fleet.devices)
    yield _gauge("recsys_cloud_fleet_guard_mean_gain_diff",
                 "pooled mean gain(edit) - gain(base) per click", fleet.mean)  # fmt: skip


def writer_families(writer: Any) -> Iterator[Metric]:
    """The store writer's queue, counters and transaction latency histogram."""
    st = writer.stats()
    yield _gauge("recsys_store_writer_queue_depth", "store writes queued", st["queued"])
    yield _gauge("recsys_store_writer_queue_size", "store write queue capacity", st["queue_size"])
    ops = CounterMetricFamily(
        "recsys_store_writer_ops", "store write operations by result", labels=["result"]
    )
    for result in ("written", "failed", "dropped"):
        ops.add_metric([result], st[result])
    yield ops
    yield _counter("recsys_store_writer_retries", "transaction retries after transient errors",
                   st["retried"])  # fmt: skip
    yield _counter("recsys_store_writer_rows", "rows the writer committed", st["rows"])
    yield from writer.write_seconds.collect()


def cloud_collector(servicer: Any, engine: Any) -> CallbackCollector:
    """A collector of :func:`cloud_families` for ``servicer`` and its ``engine``."""
    return CallbackCollector(lambda: cloud_families(servicer, engine), "cloud")
