"""The report's paired comparisons: which pairs, and their CIs over the whole replay
period and its late third."""

from __future__ import annotations

import numpy as np

from recsys.replay.config import PolicySpec
from recsys.replay.records import EventRecords
from recsys.replay.report import comparison_pairs, comparisons


def test_pairs_name_finetune_duet_and_the_frozen_twin() -> None:
    specs = [
        PolicySpec("static"),
        PolicySpec("finetune"),
        PolicySpec("duet", "gate", 1.0),
        PolicySpec("duet", "gate", 0.1),
        PolicySpec.parse("system:gate:0.1"),
        PolicySpec.parse("system-live:gate:0.1"),
        PolicySpec.parse("system-noproto:gate:1.0"),
        PolicySpec.parse("system-continual:gate:1.0"),
    ]
    pairs = set(comparison_pairs(specs))
    assert ("system-live gate 10%", "system gate 10%") in pairs
    assert ("system-continual gate 100%", "system-noproto gate 100%") in pairs
    assert ("system gate 10%", "duet gate 10%") in pairs  # same trigger and budget
    assert ("system-noproto gate 100%", "duet gate 100%") in pairs
    assert ("system gate 10%", "finetune every 5") in pairs
    assert not any(a in ("static", "finetune every 5") for a, _ in pairs)


def _records(rank: np.ndarray, users: np.ndarray, ts: np.ndarray) -> EventRecords:
    n = len(rank)
    return EventRecords(
        user=users, item=np.arange(n), timestamp=ts, rank=rank, auc=np.full(n, 0.5),
        requested=np.zeros(n, dtype=bool),
    )  # fmt: skip


def test_late_third_is_measured_on_the_latest_events() -> None:
    n = 300
    users = np.arange(n) % 30
    ts = np.arange(n)
    better = np.where(ts >= 200, 1, 50)  # only late events are ranked first
    base = np.full(n, 50)
    out = comparisons(
        {"a": _records(better, users, ts), "b": _records(base, users, ts)}, [("a", "b")], 0, 200
    )[0]
    assert out["late_diff"] > 0.9 and out["late_ci95"][0] > 0.9
    assert abs(out["diff"] - out["late_diff"] * 100 / n) < 0.02
    assert 199 <= out["late_from"] <= 200
