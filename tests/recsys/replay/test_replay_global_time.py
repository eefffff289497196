"""The global-time replay: system-live (prototypes refined online into the store) and
system-continual (an adaptor that keeps learning from the uplinks) served by one cloud
in stream order; deterministic, no look-ahead, per-device policies unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from codebook.continual import ContinualConfig
from codebook.store import PrototypeStore
from recsys.errors import ValidationError
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.engine import prepare_replay, run_replay
from recsys.replay.global_time import collect_requests, replay_global, request_time
from recsys.replay.replayer import Replayer

# small slices and refreshes: the tiny world's stream spans a few thousand seconds
CFG = ReplayConfig(
    min_history=3,
    negatives=10,
    gate_window=4,
    slice_s=200.0,
    continual=ContinualConfig(
        interval_s=400.0,
        steps=10,
        lr=3e-3,
        min_examples=4,
        batch_size=16,
        holdout=0.5,
        min_held_out=2,
    ),
)
STATIC = PolicySpec("static")
FROZEN = PolicySpec("system", "timer", 0.5)
LIVE = PolicySpec.parse("system-live:timer:0.5")
CONT = PolicySpec.parse("system-continual:timer:0.5")


def test_parse_and_labels() -> None:
    assert LIVE.label == "system-live timer 50%" and LIVE.global_time and LIVE.prototypes
    assert CONT.label == "system-continual timer 50%" and CONT.global_time
    assert not CONT.prototypes and not FROZEN.global_time
    with pytest.raises(ValidationError):
        PolicySpec(kind="system", prototypes=False, live=True)
    with pytest.raises(ValidationError):
        PolicySpec(kind="duet", continual=True)


def test_requests_are_served_in_stream_order(world) -> None:
    specs = [LIVE, CONT]
    prep = prepare_replay(world.ds, CFG, specs, cache=world.cache)
    rep = Replayer(prep.art_path, world.cache, world.ds.name, CFG, specs, prep.calibrations)
    try:
        events = prep.events()
        reqs, by_user = collect_requests(rep, events)
        assert reqs == sorted(reqs) and len(reqs) > 20
        assert len({r.user for r in reqs}) > 5
        for r in reqs[:10]:  # a request carries the time of the event it was made after
            ev = by_user[r.user]
            assert r.time == request_time(ev, r.length)
            assert r.time <= ev.timestamps[max(r.length - len(ev.start), 0)]
    finally:
        rep.close()


def test_live_bank_writes_versions_and_replays_deterministically(world, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    cfg = dataclasses.replace(CFG, store_url=url)
    specs = [STATIC, FROZEN, LIVE, CONT]
    run = run_replay(world.ds, cfg, specs, cache=world.cache, progress=False)
    info = run.meta["global_time"]
    assert info["requests"][LIVE.label] == run.costs[LIVE.label]["requests"] > 0
    assert info["prototypes"]["versions_written"] >= 1
    assert info["store"]["writes"] > 0 and info["slices"] > 1
    learned = info["policies"][CONT.label]
    assert learned["refreshes"] >= 1 and learned["examples"] > 0
    assert run.meta["config"]["store_url"] == "sqlite"  # no path or password in results
    with PrototypeStore.open(url) as store:  # every version is in the store
        protos = [p for p in store.list_prototypes() if p.name.startswith("replay-")]
        versions = sum(store.count_versions(p.id) for p in protos)
        assert versions == len(protos) + info["prototypes"]["versions_written"]
    # the frozen system and the live one share request points; the live bank changes edits
    a, b = run.records[FROZEN.label], run.records[LIVE.label]
    assert np.array_equal(a.requested, b.requested)
    assert (
        run.costs[LIVE.label]["prototype_downloads"]
        > run.costs[FROZEN.label]["prototype_downloads"]
    )  # devices download new versions
    # the per-device policies are exactly those of a replay without the global ones
    alone = run_replay(world.ds, CFG, [STATIC, FROZEN], cache=world.cache, progress=False)
    assert np.array_equal(alone.records[FROZEN.label].rank, a.rank)
    # deterministic: a second run (fresh temporary store) gives the same figures
    again = run_replay(world.ds, CFG, [STATIC, FROZEN, LIVE, CONT], cache=world.cache,
                       progress=False)  # fmt: skip
    for s in (LIVE, CONT):
        assert np.array_equal(again.records[s.label].rank, run.records[s.label].rank)
        assert np.allclose(again.records[s.label].auc, run.records[s.label].auc)


def test_continual_learning_keeps_a_refresh_only_when_it_helps(world) -> None:
    never = dataclasses.replace(CFG, continual=dataclasses.replace(CFG.continual, steps=0))
    bare = PolicySpec.parse("system-noproto:timer:0.5")
    run = run_replay(world.ds, never, [bare, CONT], cache=world.cache, progress=False)
    # with no refresh steps the continual adaptor is the trained one
    assert np.array_equal(run.records[bare.label].rank, run.records[CONT.label].rank)
    # validated: a refresh is kept only when the held-out devices' NDCG@10 went up
    checked = run_replay(world.ds, CFG, [bare, CONT], cache=world.cache, progress=False)
    info = checked.meta["global_time"]["policies"][CONT.label]
    done = [h for h in info["history"] if h["steps"]]
    assert len(done) == info["refreshes"] >= 2
    for h in done:
        assert h["accepted"] == (h["held_out_ndcg10_after"] > h["held_out_ndcg10_before"])
        assert h["train_loss_last"] < h["train_loss_first"]  # it does learn
    r0, r1 = checked.records[bare.label], checked.records[CONT.label]
    if info["accepted"] == 0:  # every refresh rolled back: the trained adaptor's edits
        assert np.array_equal(r0.rank, r1.rank)
    # unvalidated: every refresh is kept and the edits change
    cfg = dataclasses.replace(CFG, continual=dataclasses.replace(CFG.continual, validate=False))
    kept = run_replay(world.ds, cfg, [bare, CONT], cache=world.cache, progress=False)
    assert kept.meta["global_time"]["policies"][CONT.label]["accepted"] == info["refreshes"]
    k0, k1 = kept.records[bare.label], kept.records[CONT.label]
    assert not np.allclose(k0.auc, k1.auc)


def test_no_event_at_or_after_t_influences_an_edit_served_before_t(world) -> None:
    """Change the item of every replay event at or after t (every device); every
    global-time policy's figures for the events before t stay identical."""
    specs = [LIVE, CONT]
    prep = prepare_replay(world.ds, CFG, specs, cache=world.cache)
    args = (prep.art_path, world.cache, world.ds.name, CFG, specs, prep.calibrations)
    events = prep.events()
    ts = np.sort(np.concatenate([ev.timestamps for ev in events]))
    t = int(ts[len(ts) // 2])
    n = world.ds.num_items
    changed = []
    for ev in events:
        late = ev.timestamps >= t
        items = np.where(late, (ev.items * 7 + 3) % n, ev.items)
        changed.append(dataclasses.replace(ev, items=items))
    assert any(not np.array_equal(a.items, b.items) for a, b in zip(events, changed, strict=True))
    base, info = replay_global(args, events, progress=False)
    pert, _ = replay_global(args, changed, progress=False)
    assert info["policies"][CONT.label]["refreshes"] >= 1
    assert info["prototypes"]["versions_written"] >= 1
    compared = 0
    for a, b in zip(base, pert, strict=True):
        for s in specs:
            ra, rb = a.records[s.label], b.records[s.label]
            early = ra.timestamp < t
            assert np.array_equal(ra.rank[early], rb.rank[early]), s.label
            assert np.allclose(ra.auc[early], rb.auc[early]), s.label
            compared += int(early.sum())
        # and the perturbation does reach later events somewhere
    assert compared > 20
    late_diff = any(
        not np.array_equal(a.records[s.label].rank, b.records[s.label].rank)
        for a, b in zip(base, pert, strict=True)
        for s in specs
    )
    assert late_diff


def test_each_policy_learns_from_its_own_requests_only(world) -> None:
    """Two live budgets: each has its own bank; the 20 % policy's edits are those of a
    run without the 50 % one."""
    low = PolicySpec.parse("system-live:timer:0.2")
    both = run_replay(world.ds, CFG, [LIVE, low], cache=world.cache, progress=False)
    alone = run_replay(world.ds, CFG, [low], cache=world.cache, progress=False)
    assert np.array_equal(both.records[low.label].rank, alone.records[low.label].rank)
    assert np.allclose(both.records[low.label].auc, alone.records[low.label].auc)
    per = both.meta["global_time"]["policies"]
    assert per[low.label]["versions_written"] < per[LIVE.label]["versions_written"]


def test_the_services_refuse_what_they_cannot_replay_in_global_time(world) -> None:
    with pytest.raises(ValidationError, match="in-process global-time replay only"):
        run_replay(world.ds, CFG, [CONT], cache=world.cache, progress=False, via="grpc")
    two = [LIVE, PolicySpec.parse("system-live:timer:0.2")]
    with pytest.raises(ValidationError, match="one system-live policy per run"):
        run_replay(world.ds, CFG, two, cache=world.cache, progress=False, via="grpc")


def test_no_refresh_before_enough_held_out_examples(world) -> None:
    learner = dataclasses.replace(CFG.continual, min_held_out=10**6)
    strict = dataclasses.replace(CFG, continual=learner)
    bare = PolicySpec.parse("system-noproto:timer:0.5")
    run = run_replay(world.ds, strict, [bare, CONT], cache=world.cache, progress=False)
    assert run.meta["global_time"]["policies"][CONT.label]["refreshes"] == 0
    assert np.array_equal(run.records[bare.label].rank, run.records[CONT.label].rank)


def test_one_request_per_slice_serves_them_one_at_a_time(world) -> None:
    cfg = dataclasses.replace(CFG, slice_s=0.0)
    run = run_replay(world.ds, cfg, [LIVE], cache=world.cache, progress=False)
    info = run.meta["global_time"]
    assert info["slices"] == info["requests"][LIVE.label] == run.costs[LIVE.label]["requests"]
    assert info["prototypes"]["versions_written"] >= 1
