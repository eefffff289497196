"""The replay stream (events, histories, evaluated events, negatives) and the config /
policy parsing, on a tiny dataset (no trained artefacts needed)."""

from __future__ import annotations

import numpy as np
import pytest
from replay_world import drift_dataset

from recsys.data import time_split, user_sequences
from recsys.errors import ValidationError
from recsys.replay.config import (
    GrpcOptions,
    PolicySpec,
    ReplayConfig,
    default_policies,
    parse_budget,
)
from recsys.replay.records import EventRecords
from recsys.replay.stream import build_stream


@pytest.fixture(scope="module")
def ds():
    return drift_dataset()


def test_stream_holds_the_replay_period_per_user(ds) -> None:
    cfg = ReplayConfig(min_history=3, negatives=7)
    stream = build_stream(ds, cfg)
    split = time_split(ds, quantile=0.8)
    assert len(stream) == len(split.replay) + len(split.cold_replay)
    train = user_sequences(ds, split.train)
    for u in stream.users:
        sl = stream.user_slice(int(u))
        assert np.array_equal(stream.start_history(int(u)), train[u])
        assert np.all(np.diff(stream.timestamp[sl]) >= 0)  # time order within a user
        assert np.array_equal(stream.position[sl], len(train[u]) + np.arange(sl.stop - sl.start))
        assert (stream.timestamp[sl] >= split.cut).all()
    assert np.array_equal(stream.evaluated, stream.position >= 3)
    summary = stream.summary()
    assert summary["evaluated_cold_user_events"] > 0 and summary["evaluated_warm_user_events"] > 0
    assert summary["evaluated_events"] + summary["skipped_events_short_history"] == len(stream)
    order = stream.time_order()
    assert np.all(np.diff(stream.timestamp[order]) >= 0)


def test_negatives_are_valid_deterministic_and_independent_of_other_users(ds) -> None:
    cfg = ReplayConfig(min_history=3, negatives=7, seed=3)
    full = build_stream(ds, cfg)
    again = build_stream(ds, cfg)
    assert np.array_equal(full.negatives, again.negatives)
    for j in np.flatnonzero(full.evaluated):
        u, p = int(full.user[j]), int(full.position[j])
        hist = full.full_sequence(u)[:p]
        negs = full.negatives[j]
        assert full.item[j] not in negs and not np.isin(negs, hist).any()
        assert len(set(negs.tolist())) == 7  # without replacement (the pool is large enough)
    assert (full.negatives[~full.evaluated] == -1).all()
    some = full.users[::3][:4].tolist()
    part = build_stream(ds, cfg, users=some)
    assert part.users.tolist() == sorted(some)
    for u in some:
        assert np.array_equal(
            part.negatives[part.user_slice(u)], full.negatives[full.user_slice(u)]
        )
    other_seed = build_stream(ds, ReplayConfig(min_history=3, negatives=7, seed=4))
    assert not np.array_equal(other_seed.negatives, full.negatives)


def test_user_limits_sample_with_the_seed(ds) -> None:
    a = build_stream(ds, ReplayConfig(min_history=3, max_users=5, seed=1))
    b = build_stream(ds, ReplayConfig(min_history=3, max_users=5, seed=1))
    c = build_stream(ds, ReplayConfig(min_history=3, quick=True, quick_users=3))
    assert a.users.tolist() == b.users.tolist() and len(a.users) == 5 and len(c.users) == 3
    with pytest.raises(ValidationError, match="outside"):
        build_stream(ds, ReplayConfig(), users=[10_000])


def test_max_events_keeps_each_devices_first_events(ds) -> None:
    full = build_stream(ds, ReplayConfig(min_history=3, negatives=5))
    cut = build_stream(ds, ReplayConfig(min_history=3, negatives=5, max_events=2))
    assert cut.users.tolist() == full.users.tolist()
    assert len(cut) < len(full)
    for u in full.users.tolist():
        a, b = full.user_slice(u), cut.user_slice(u)
        n = min(2, a.stop - a.start)
        assert b.stop - b.start == n
        for name in ("item", "timestamp", "position", "evaluated", "negatives"):
            got, want = getattr(cut, name)[b], getattr(full, name)[a][:n]
            assert np.array_equal(got, want), (u, name)


def test_until_quantile_replays_a_validation_period_between_two_cuts(ds) -> None:
    cfg = ReplayConfig(quantile=0.6, until_quantile=0.8, min_history=3, negatives=5)
    val = build_stream(ds, cfg)
    start, end = time_split(ds, quantile=0.6), time_split(ds, quantile=0.8)
    assert (val.timestamp >= start.cut).all() and (val.timestamp < end.cut).all()
    want = np.concatenate([start.replay, start.cold_replay])
    assert len(val) == int((ds.timestamps[want] < end.cut).sum()) > 0
    full = build_stream(ds, ReplayConfig(quantile=0.6, min_history=3, negatives=5))
    for u in val.users.tolist():  # each device's first events of the longer period
        a, b = full.user_slice(u), val.user_slice(u)
        assert np.array_equal(val.item[b], full.item[a][: b.stop - b.start])
        assert np.array_equal(val.negatives[b], full.negatives[a][: b.stop - b.start])


def test_policy_specs_labels_and_parsing() -> None:
    assert PolicySpec("static").label == "static"
    assert PolicySpec("finetune", finetune_every=10).label == "finetune every 10"
    assert PolicySpec("system", "gate", 0.05).label == "system gate 5%"
    assert PolicySpec("system", "timer", 0.2).period == 5
    assert PolicySpec.parse("system:timer:20%") == PolicySpec("system", "timer", 0.2)
    assert PolicySpec.parse("duet") == PolicySpec("duet", "gate", 1.0)
    assert PolicySpec.parse("finetune:3").finetune_every == 3
    spec = PolicySpec("system", "gate", 0.1, name="mine")
    assert PolicySpec.from_dict(spec.to_dict()) == spec and spec.label == "mine"
    assert parse_budget("0.1") == parse_budget("10%") == parse_budget("10") == 0.1
    labels = [s.label for s in default_policies()]
    assert len(labels) == len(set(labels)) == 13
    assert "system timer 5%" in labels and "finetune every 5" in labels
    assert all(s.prototypes for s in default_policies())


def test_the_system_without_prototypes_is_a_variant_of_system() -> None:
    bare = PolicySpec.parse("system-noproto:timer:0.2")
    assert bare == PolicySpec(kind="system", trigger="timer", budget=0.2, prototypes=False)
    assert bare.label == "system-noproto timer 20%" and bare.edit_kind == "system-noproto"
    assert PolicySpec.parse("system:timer:0.2").edit_kind == "system"
    assert PolicySpec("static").edit_kind is None and PolicySpec("duet").edit_kind == "duet"
    assert PolicySpec.from_dict(bare.to_dict()) == bare


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PolicySpec(kind="magic"), "kind: Input should be 'static'"),
        (lambda: PolicySpec(kind="system", trigger="sometimes"), "trigger"),
        (lambda: PolicySpec(kind="system", budget=0.0), "budget: Input should be greater than 0"),
        (lambda: PolicySpec(kind="system", budget=1.5), "budget: Input should be less than"),
        (lambda: PolicySpec("finetune", finetune_every=0), "finetune_every"),
        (lambda: PolicySpec(kind="duet", prototypes=False), "system policies only"),
        (lambda: PolicySpec(kind="static", name=" "), "name must not be empty"),
        (lambda: PolicySpec.from_dict({"kind": "static", "budgte": 1}), "budgte: Unexpected"),
        (lambda: PolicySpec.from_dict({"trigger": "gate"}), "kind: Field required"),
        (lambda: PolicySpec.parse("magic:gate"), "kind must be one of"),
        (lambda: PolicySpec.parse("static:3"), "no options"),
        (lambda: parse_budget("lots"), "not a number"),
        (lambda: parse_budget("0"), "must be in"),
        (lambda: ReplayConfig(negatives=0), "negatives"),
        (lambda: ReplayConfig(min_history=1), "min_history"),
        (lambda: ReplayConfig(payload_dtype="fp8"), "payload_dtype"),
        (lambda: ReplayConfig(max_events=0), "max_events"),
        (lambda: ReplayConfig(until_quantile=0.7), "must be above quantile"),
        (lambda: ReplayConfig.from_dict({"seeds": 1}), "seeds: Unexpected keyword"),
        (lambda: GrpcOptions(concurrency=0), "concurrency"),
        (lambda: GrpcOptions(cloud_deadline_s=10.0, rpc_timeout_s=5.0), "RecordEvent waits"),
    ],
)
def test_bad_configs_fail_clearly(make, match) -> None:
    with pytest.raises(ValidationError, match=match):
        make()


def test_event_records_metrics() -> None:
    rec = EventRecords(
        user=[2, 1, 1],
        item=[5, 6, 7],
        timestamp=[30, 10, 20],
        rank=[1, 3, 20],
        auc=[1.0, 0.5, 0.0],
        requested=[True, False, True],
    )
    assert np.allclose(rec.ndcg10(), [1.0, 0.5, 0.0])
    assert np.allclose(rec.mrr10(), [1.0, 1 / 3, 0.0])
    users, means, counts = rec.per_user_mean("ndcg@10")
    assert (
        users.tolist() == [1, 2] and np.allclose(means, [0.25, 1.0]) and counts.tolist() == [2, 1]
    )
    assert rec.sorted().timestamp.tolist() == [10, 20, 30]
    assert rec.uauc() == pytest.approx((0.25 + 1.0) / 2)
    assert rec.summary()["request_rate"] == pytest.approx(2 / 3)
    with pytest.raises(ValidationError, match="shape"):
        EventRecords([1], [1, 2], [1], [1], [0.5], [True])
