"""Per-device results merged into a run's records and costs, and the services' extra
cost figures (latency percentiles, failures, fallbacks) that only gRPC runs carry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.replay.costs import CostAccumulator
from recsys.replay.records import EventRecords, UserResult, merge_results


def _records(user: int, ts: list[int], rank: list[int]) -> EventRecords:
    n = len(ts)
    return EventRecords([user] * n, [1] * n, ts, rank, [0.5] * n, [False] * n)


def test_merge_results_sorts_records_and_merges_costs() -> None:
    acc = [CostAccumulator(), CostAccumulator()]
    acc[0].add(decode_us=1.0, apply_us=2.0, device_flops=10.0, uplink_bytes=100, initial=True)
    acc[1].add(decode_us=3.0, apply_us=4.0, device_flops=30.0, uplink_bytes=300, initial=True)
    acc[1].add(decode_us=5.0, apply_us=6.0, device_flops=50.0, uplink_bytes=500)
    results = [
        UserResult(3, {"p": _records(3, [10, 30], [1, 2])}, {"p": acc[0]}),
        UserResult(7, {"p": _records(7, [20], [4])}, {"p": acc[1]}),
    ]
    records, costs = merge_results(results, ["p"])
    assert records["p"].timestamp.tolist() == [10, 20, 30]
    assert records["p"].user.tolist() == [3, 7, 3] and records["p"].rank.tolist() == [1, 4, 2]
    c = costs["p"]
    assert c["requests"] == 3 and c["initial_requests"] == 2
    assert c["uplink_bytes_total"] == 900 and c["device_us_per_event"] == pytest.approx(21 / 3)
    assert "recommend_ms_p50" not in c  # an in-process run has no round trips


def test_rpc_costs_report_latency_percentiles_failures_and_fallbacks() -> None:
    a, b = CostAccumulator(rpc=True), CostAccumulator(rpc=True)
    a.recommend_ms += [1.0, 2.0, 3.0]
    b.recommend_ms += [4.0] * 97
    a.record_ms += [5.0]
    a.failed_requests, b.fallback_answers = 1, 2
    a.merge(b)
    s = a.summary(evaluated_events=100)
    assert s["recommend_ms_p50"] == 4.0 and s["recommend_ms_p99"] == pytest.approx(4.0)
    assert s["record_event_ms_p50"] == 5.0
    assert s["failed_requests"] == 1 and s["fallback_answers"] == 2
    empty = CostAccumulator(rpc=True).summary(0)
    assert math.isnan(empty["recommend_ms_p99"]) and empty["failed_requests"] == 0
    assert np.isfinite(s["recommend_ms_p50"])
