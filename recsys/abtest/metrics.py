"""The metrics an experiment may name, with their direction and how they are computed.

Every metric is a **per-user mean over the user's events** (the user is the randomisation
unit, so the user is also the analysis unit and users are independent). Each event carries:

* ``rank``: 1-based rank of the true next item under the user's arm (full catalogue);
* ``auc``: sampled AUC of the event (replay only; the live event log has none);
* ``requested``: 1 if the device asked the cloud for an edit at this event;
* ``bytes``: bytes moved between device and cloud at this event (up + down).

Per-event values (vectorised over E events, numpy float64 [E]):

* ``ndcg@10`` = 1 / log2(rank + 1) if rank <= 10 else 0
* ``hr@10``   = 1 if rank <= 10 else 0
* ``mrr@10``  = 1 / rank if rank <= 10 else 0
* ``auc``, ``request_rate`` (= requested), ``bytes_per_event`` (= bytes)

``higher_is_better`` decides what "harmful" means for a guardrail.

Example::

    event_values("ndcg@10", rank=np.array([1, 3, 20]))   # array([1., 0.5, 0.])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.errors import ValidationError
from recsys.metrics import rank_metric


@dataclass(frozen=True)
class MetricDef:
    name: str
    higher_is_better: bool
    source: str  # the event field it is computed from
    description: str


METRICS: dict[str, MetricDef] = {
    m.name: m
    for m in (
        MetricDef("ndcg@10", True, "rank", "NDCG@10 of the true next item"),
        MetricDef("hr@10", True, "rank", "hit rate: true next item in the top 10"),
        MetricDef("mrr@10", True, "rank", "reciprocal rank of the true next item (top 10)"),
        MetricDef("auc", True, "auc", "sampled AUC of the true next item vs negatives"),
        MetricDef("request_rate", False, "requested", "edit requests per event (cloud cost)"),
        MetricDef("bytes_per_event", False, "bytes", "device<->cloud bytes per event"),
    )
}
TOP_K = 10


def check_metric(name: str, where: str = "metric") -> MetricDef:
    """The definition of ``name``; a clear error listing the known metrics otherwise."""
    if name not in METRICS:
        raise ValidationError(f"{where}: unknown metric {name!r}; known metrics: {list(METRICS)}")
    return METRICS[name]


def event_values(name: str, **fields: np.ndarray) -> np.ndarray:
    """Per-event values of metric ``name`` from the event fields, float64 [E].

    ``fields`` holds the arrays named in :data:`METRICS` (``rank``, ``auc``,
    ``requested``, ``bytes``); only the one the metric needs is read.
    """
    metric = check_metric(name)
    if metric.source not in fields or fields[metric.source] is None:
        raise ValidationError(
            f"metric {name!r} needs the per-event field {metric.source!r}, which this data "
            "does not have; drop it from the experiment's metrics"
        )
    x = np.asarray(fields[metric.source], dtype=np.float64)
    if metric.source != "rank":
        return x
    if np.any(x < 1):
        raise ValidationError("ranks must be 1-based (>= 1)")
    return rank_metric(name.split("@")[0], x, TOP_K)  # hr / ndcg / mrr @10


def per_user_means(
    user_index: np.ndarray, values: np.ndarray, num_users: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` [E] per user; returns (means [U], counts [U]).

    ``user_index`` [E] int in [0, num_users). Users without events get NaN.
    """
    counts = np.bincount(user_index, minlength=num_users).astype(np.float64)
    sums = np.bincount(user_index, weights=values, minlength=num_users)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)
    return means, counts
