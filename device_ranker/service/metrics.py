"""The device's Prometheus figures, read from counters the engine keeps anyway.

:func:`device_collector` returns a collector for the server's registry
(:class:`recsys.serving.metrics.ServerMetrics`); at each scrape it reads the engine:

* ``recsys_device_edits_total{outcome}``: edit requests sent to the cloud
  (``requested``), edits installed (``applied``), requests that failed (``failed``:
  cloud down or slow, a rejected edit, an edit the state file refused) and, when the
  device runs a harm guard, edits it or the cloud's fleet guard held out (``guarded``:
  with a durable state it continues from the stored count after a restart, as GetStatus's
  guard counters do; the other outcomes count this process);
* ``recsys_device_answers_total{mode}``: Recommend answers by serving mode (``base``,
  ``edited``, ``fallback_last_edit``, ``fallback_base``: the fallbacks are the answers
  served without a fresh edit because the cloud failed);
* ``recsys_device_cloud_reachable``: 1 when the cloud answered its last probe or call;
* ``recsys_device_users`` (held in memory), ``recsys_device_users_with_edit``,
  ``recsys_device_max_users``, ``recsys_device_users_memory_bytes`` (their estimated
  memory, when the user store accounts for it), ``recsys_device_users_evicted_total``,
  ``recsys_device_users_reloaded_total``;
* ``recsys_device_edit_bytes_total{direction=up|down}``: edit traffic;
* ``recsys_device_batch_size``: histogram of the Recommend micro-batches' sizes,
  ``recsys_device_batch_queue_depth``: calls waiting for a batch.

The process's memory is ``process_resident_memory_bytes`` (the server's process
collector, :mod:`recsys.serving.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from recsys.serving.metrics import CallbackCollector, batch_size_family

MODES = ("base", "edited", "fallback_last_edit", "fallback_base")


def device_families(engine: Any) -> Iterator[Metric]:
    """The device's metric families now (see the module docstring)."""
    edits = engine.edits
    fam = CounterMetricFamily("recsys_device_edits", "edit requests by outcome", labels=["outcome"])
    fam.add_metric(["requested"], edits.requests)
    fam.add_metric(["applied"], edits.applied)
    fam.add_metric(["failed"], edits.failures)
    guarded = getattr(edits, "guarded", None)  # a device harm guard's refusals, when it has one
    if guarded is not None:
        fam.add_metric(["guarded"], guarded)
    yield fam
    answers = CounterMetricFamily(
        "recsys_device_answers", "Recommend answers by serving mode", labels=["mode"]
    )
    for mode in MODES:
        answers.add_metric([mode], engine.served.get(mode, 0))
    yield answers
    link = engine.link
    yield GaugeMetricFamily(
        "recsys_device_cloud_reachable",
        "1 when the cloud answered its last health probe or call (0 without a cloud)",
        value=float(link is not None and link.reachable),
    )
    users = list(engine.users.values())
    store = engine.store
    yield GaugeMetricFamily("recsys_device_users", "users held in memory", value=len(users))
    yield GaugeMetricFamily(
        "recsys_device_users_with_edit",
        "users in memory with an active edit",
        value=sum(st.edit is not None for st in users),
    )
    yield GaugeMetricFamily("recsys_device_max_users", "users held at most", value=store.max_users)
    if hasattr(store, "bytes_held"):  # the users' estimated memory (max_memory_mb accounting)
        yield GaugeMetricFamily(
            "recsys_device_users_memory_bytes",
            "estimated memory of the users held (histories, caches, edits; not the model)",
            value=store.bytes_held,
        )
    yield CounterMetricFamily(
        "recsys_device_users_evicted", "users evicted from memory (LRU)", value=store.evicted
    )
    yield CounterMetricFamily(
        "recsys_device_users_reloaded",
        "evicted users reloaded from the state",
        value=store.reloaded,
    )
    traffic = CounterMetricFamily(
        "recsys_device_edit_bytes", "edit traffic with the cloud, bytes", labels=["direction"]
    )
    traffic.add_metric(["up"], edits.bytes_up)
    traffic.add_metric(["down"], edits.bytes_down)
    yield traffic
    batcher = engine.batcher
    yield batch_size_family(
        "recsys_device_batch_size", "Recommend calls per ranking pass", {batcher.name: batcher}
    )
    yield GaugeMetricFamily(
        "recsys_device_batch_queue_depth", "Recommend calls waiting for a batch",
        value=batcher.queued(),
    )  # fmt: skip


def device_collector(handle_engine: Any) -> CallbackCollector:
    """A collector of :func:`device_families` for a :class:`DeviceEngine`."""
    return CallbackCollector(lambda: device_families(handle_engine), "device")
