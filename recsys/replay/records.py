"""Per-event results of one policy (aligned arrays, the metrics derived from them) and
what a replay driver returns per device.

Both drivers (in process: :mod:`recsys.replay.replayer`; through the services:
:mod:`recsys.replay.grpc_driver`) return one :class:`UserResult` per device: its
:class:`EventRecords` and :class:`~recsys.replay.costs.CostAccumulator` per policy label;
:func:`merge_results` turns them into the run's records and cost summaries.

Shape letter: E evaluated events of the policy, U users.

Example::

    rec = EventRecords.concat([part_a, part_b]).sorted()
    rec.ndcg10().mean(), rec.hr10().mean(), rec.requested.mean()
    users, means, counts = rec.per_user_mean("ndcg@10")   # [U], [U], [U]
    records, costs = merge_results(user_results, ["static", "system gate 20%"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from recsys.errors import ValidationError
from recsys.metrics import rank_metric
from recsys.replay.costs import CostAccumulator

METRICS = ("ndcg@10", "hr@10", "mrr@10", "auc")


@dataclass
class EventRecords:
    """One policy's evaluated events, sorted by (timestamp, user) once merged.

    Attributes:
        user: [E] int64 dataset user index.
        item: [E] int64 target item index.
        timestamp: [E] int64 event time.
        rank: [E] int64 1-based rank of the target in the full catalogue, the history's
            items excluded, ties counted pessimistically.
        auc: [E] float64 AUC of the target against the event's sampled negatives.
        requested: [E] bool, the event triggered a cloud request / fine-tuning update
            (decided after the event was scored; the result serves later events only).
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rank: np.ndarray
    auc: np.ndarray
    requested: np.ndarray

    # a plain dataclass (not a pydantic config): it holds arrays, coerced and shape-checked here
    def __post_init__(self) -> None:
        self.user = np.asarray(self.user, dtype=np.int64)
        self.item = np.asarray(self.item, dtype=np.int64)
        self.timestamp = np.asarray(self.timestamp, dtype=np.int64)
        self.rank = np.asarray(self.rank, dtype=np.int64)
        self.auc = np.asarray(self.auc, dtype=np.float64)
        self.requested = np.asarray(self.requested, dtype=bool)
        n = len(self.user)
        for f in fields(self):
            arr = getattr(self, f.name)
            if arr.shape != (n,):
                raise ValidationError(
                    f"EventRecords.{f.name} must have shape [{n}], got {arr.shape}"
                )
        if n and int(self.rank.min()) < 1:
            raise ValidationError("ranks are 1-based; got a rank < 1")

    def __len__(self) -> int:
        return len(self.user)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls) -> EventRecords:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, np.zeros(0), np.zeros(0, dtype=bool))

    @classmethod
    def concat(cls, parts: Sequence[EventRecords]) -> EventRecords:
        if not parts:
            return cls.empty()
        return cls(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)}
        )

    def sorted(self) -> EventRecords:
        """A copy ordered by (timestamp, user); a user's own events keep their order."""
        order = np.lexsort((self.user, self.timestamp))  # stable: last key is primary
        return self.take(order)

    def take(self, idx: np.ndarray) -> EventRecords:
        return EventRecords(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def for_users(self, users: Sequence[int] | np.ndarray) -> EventRecords:
        """The events of the given users only (order kept)."""
        return self.take(np.flatnonzero(np.isin(self.user, np.asarray(users, dtype=np.int64))))

    # ---- metrics ----------------------------------------------------------------------
    def ndcg10(self) -> np.ndarray:
        """[E] NDCG@10 of one target: 1 / log2(rank + 1) if rank <= 10, else 0."""
        return rank_metric("ndcg", self.rank)

    def hr10(self) -> np.ndarray:
        """[E] 1.0 if the target is in the top 10."""
        return rank_metric("hr", self.rank)

    def mrr10(self) -> np.ndarray:
        """[E] 1 / rank if rank <= 10, else 0."""
        return rank_metric("mrr", self.rank)

    def metric(self, name: str) -> np.ndarray:
        """[E] per-event values of ``name`` (one of :data:`METRICS`)."""
        if name == "ndcg@10":
            return self.ndcg10()
        if name == "hr@10":
            return self.hr10()
        if name == "mrr@10":
            return self.mrr10()
        if name == "auc":
            return self.auc
        raise ValidationError(f"unknown metric {name!r}; use one of {METRICS}")

    def per_user_mean(
        self, metric: str | np.ndarray = "ndcg@10"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-user mean of a metric (a name or [E] values).

        Returns:
            (users [U] ascending, means [U] float64, counts [U] int64).
        """
        values = self.metric(metric) if isinstance(metric, str) else np.asarray(metric, float)
        if values.shape != (len(self),):
            raise ValidationError(f"metric values must have shape [{len(self)}]")
        users, inv = np.unique(self.user, return_inverse=True)
        counts = np.bincount(inv, minlength=len(users))
        sums = np.bincount(inv, weights=values, minlength=len(users))
        return users, sums / np.maximum(counts, 1), counts.astype(np.int64)

    def uauc(self) -> float:
        """Mean over users of their events' mean AUC (every event has the same number of
        negatives, so this is the pair-pooled per-user AUC of :func:`recsys.metrics.uauc`)."""
        if not len(self):
            return float("nan")
        return float(self.per_user_mean("auc")[1].mean())

    def summary(self) -> dict[str, float]:
        """Event-averaged HR@10 / NDCG@10 / MRR@10, UAUC, counts and the request rate."""
        n = len(self)
        return {
            "events": n,
            "users": len(np.unique(self.user)),
            "hr@10": float(self.hr10().mean()) if n else float("nan"),
            "ndcg@10": float(self.ndcg10().mean()) if n else float("nan"),
            "mrr@10": float(self.mrr10().mean()) if n else float("nan"),
            "uauc": self.uauc(),
            "requested_events": int(self.requested.sum()),
            "request_rate": float(self.requested.mean()) if n else 0.0,
        }

    def to_dict(self) -> dict[str, list]:
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}


@dataclass
class UserResult:
    """One device's replay: records and costs per policy label (what a driver returns)."""

    user: int
    records: dict[str, EventRecords]
    costs: dict[str, CostAccumulator] = field(default_factory=dict)
    # fleet-guarded policies: what the pooled guard needs (recsys.replay.guard)
    guard_inputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def merge_results(
    results: Sequence[UserResult], labels: Sequence[str]
) -> tuple[dict[str, EventRecords], dict[str, dict[str, Any]]]:
    """The devices' results (in user order) -> per label the records sorted by
    (timestamp, user) and the cost summary (:meth:`CostAccumulator.summary`)."""
    records = {
        label: EventRecords.concat([r.records[label] for r in results]).sorted() for label in labels
    }
    costs = {}
    for label in labels:
        acc = CostAccumulator()
        for r in results:
            acc.merge(r.costs[label])
        costs[label] = acc.summary(len(records[label]))
    return records, costs
