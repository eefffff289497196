"""The learned gate and the harm guard in the replay, on the tiny world: the gate trained
and calibrated on the training period only, its request points equal the device's own
decisions, its base ranks are the static policy's; a guarded policy serves, event by
event, either its unguarded twin's edit or the base head, and counts its decisions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device_ranker.gate import GateConfig, GateState
from device_ranker.guard import GuardConfig
from device_ranker.learned_gate import LearnedGate, load_gate_model
from recsys.errors import ValidationError
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.engine import run_replay
from recsys.replay.gate_data import GateDataConfig
from recsys.replay.gate_training import GateTrainConfig, train_gate
from recsys.replay.replayer import Replayer
from recsys.replay.stream import build_stream

CFG = ReplayConfig(min_history=3, negatives=10, gate_window=4)
POLICIES = [
    PolicySpec("static"),
    PolicySpec("system", "timer", 1.0),
    PolicySpec("system", "timer", 1.0, guard=True),
    PolicySpec("system", "timer", 0.5),
    PolicySpec("system", "gate", 0.5),
    PolicySpec("system", "learned", 0.5),
    PolicySpec("system", "learned", 0.5, guard=True),
]


@pytest.fixture(scope="module")
def gate(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "gate.npz"
    cfg = GateTrainConfig(
        data=GateDataConfig(horizon=2, samples_per_user=3, min_history=3, window=4, max_age=4),
        budgets=(0.5,),
        hidden=(0, 4),
        decays=(1e-2,),
        epochs=30,
    )
    art = world.cache / "artifacts" / "drift" / "adaptor" / "adaptor.pt"
    res = train_gate(art, world.cache, world.ds, cfg, path)
    return path, res


@pytest.fixture(scope="module")
def run(world, gate):
    cfg = dataclasses.replace(CFG, learned_gate=str(gate[0]))
    return run_replay(world.ds, cfg, POLICIES, cache=world.cache, progress=False)


def test_training_chooses_on_training_users_and_calibrates(gate) -> None:
    path, res = gate
    model = load_gate_model(path)
    assert res["selected"]["label"] in ("ndcg", "dcg") and res["samples"] > 0
    assert 0.5 in model.thresholds and 0.0 < model.train_rates[0.5] <= 0.5 + 1e-9
    assert model.meta["dataset_fingerprint"] and model.meta["ranker"] == "ranker-time.pt"


def test_learned_requests_are_the_devices_own_decisions(world, gate, run) -> None:
    stream = build_stream(world.ds, CFG)
    cfg = dataclasses.replace(CFG, learned_gate=str(gate[0]))
    rep = Replayer(
        world.cache / "artifacts" / "drift" / "adaptor" / "adaptor.pt",
        world.cache, "drift", cfg, [s for s in POLICIES if s.trigger != "gate"], {},
    )  # fmt: skip
    model = load_gate_model(gate[0])
    vectors = rep.ranker.model.item_table.detach().numpy()
    static = run.records["static"]
    try:
        for u in stream.users[:8].tolist():
            ev = stream.user_events(int(u))
            seq, start = ev.sequence, len(ev.start)
            ranks = rep.base_click_ranks(seq, start)
            # the gate's base ranks are exactly the ranks the static policy is scored by
            mine = static.user == u
            pos = ev.positions[ev.evaluated]
            assert np.array_equal(ranks[pos], static.rank[mine])
            device = LearnedGate(
                model, GateConfig(budget=0.5, window=4, min_history=3, min_gap=1), vectors
            )
            state, asked = GateState(), []
            for length in range(start, len(seq) + 1):
                if device.decide(seq[:length], state, ranks[:length]).request:
                    device.on_request(seq[:length], state)
                    asked.append(length)
            plan = rep.request_plan(ev)
            assert plan.lengths[("learned", 0.5)].tolist() == asked
    finally:
        rep.close()


def test_guarded_events_serve_the_twin_or_the_base(run) -> None:
    static = run.records["static"]
    for guarded, twin in (
        ("system timer 100% guard", "system timer 100%"),
        ("system learned 50% guard", "system learned 50%"),
    ):
        g, t = run.records[guarded], run.records[twin]
        assert ((g.rank == t.rank) | (g.rank == static.rank)).all()
        assert np.array_equal(g.requested, t.requested)  # the same requests
        c = run.costs[guarded]
        assert c["guard_accepted"] + c["guard_rejected"] == c["requests"]
        assert c["guard_us_per_edit_p50"] >= 0.0
    assert "guard_accepted" not in run.costs["system timer 100%"]


def test_a_guard_that_never_rejects_is_the_twin(world, gate) -> None:
    cfg = dataclasses.replace(
        CFG, learned_gate=str(gate[0]), guard=GuardConfig(margin=10.0), max_users=10
    )
    specs = POLICIES[:3]
    res = run_replay(world.ds, cfg, specs, cache=world.cache, progress=False)
    g, t = res.records["system timer 100% guard"], res.records["system timer 100%"]
    assert np.array_equal(g.rank, t.rank) and res.costs[g_label(specs)]["guard_rejected"] == 0


def g_label(specs) -> str:
    return next(s.label for s in specs if s.guard)


def test_learned_gate_must_match_the_dataset_and_runs_in_process_only(
    world, gate, tmp_path
) -> None:
    with pytest.raises(ValidationError, match="in-process"):
        run_replay(world.ds, CFG, POLICIES[:3], cache=world.cache, progress=False, via="grpc")
    model = load_gate_model(gate[0])
    model.meta["dataset_fingerprint"] = "other"
    from device_ranker.learned_gate import save_gate_model

    bad = save_gate_model(model, tmp_path / "bad.npz")
    cfg = dataclasses.replace(CFG, learned_gate=str(bad))
    with pytest.raises(ValidationError, match="another dataset"):
        run_replay(world.ds, cfg, POLICIES[:6], cache=world.cache, progress=False)


def test_policy_names() -> None:
    assert PolicySpec.parse("system:learned:0.1:guard").label == "system learned 10% guard"
    assert PolicySpec.parse("duet:timer:20%:guard").guard
    with pytest.raises(ValidationError):
        PolicySpec.parse("static:guard")
    with pytest.raises(ValidationError):
        PolicySpec("finetune", guard=True)


def _device(user, ts, rank, base, served, request_ts, labels=("p",)):
    """A replayed device's fleet-guard inputs for each policy label (same evidence)."""
    from recsys.replay.costs import CostAccumulator
    from recsys.replay.records import EventRecords, UserResult

    n = len(ts)
    res = UserResult(user=user, records={}, costs={})
    for label in labels:
        res.records[label] = EventRecords(
            user=np.full(n, user), item=np.zeros(n, np.int64), timestamp=np.array(ts),
            rank=np.array(rank), auc=np.full(n, 0.5), requested=np.zeros(n, bool),
        )  # fmt: skip
        res.costs[label] = CostAccumulator()
        res.guard_inputs[label] = {
            "ts": np.array(ts),
            "diff": 1 / np.log2(1 + np.array(rank)) - 1 / np.log2(1 + np.array(base)),
            "had": np.array(served) >= 0,
            "served": np.array(served),
            "request_ts": np.array(request_ts),
            "rank": np.array(rank),
            "auc": np.full(n, 0.5),
            "base_rank": np.array(base),
            "base_auc": np.full(n, 0.9),
        }
    return res


def test_fleet_guard_pools_earlier_clicks_of_every_device() -> None:
    from recsys.replay.guard import apply_fleet_guards

    device = _device
    # device 0: its edit (made at t=0) ranks 8 clicks at t=1..8 far worse than the base
    harmed = device(0, list(range(1, 9)), [40, 50, 30, 60, 45, 35, 55, 50], [1, 2, 1, 3, 2, 1, 2, 1],
                    [0] * 8, [0])  # fmt: skip
    # device 1: one request before those clicks (t=1), one after them all (t=20)
    other = device(1, [2, 21, 22], [5, 5, 5], [9, 9, 9], [0, 1, 1], [1, 20])
    apply_fleet_guards([harmed, other], GuardConfig(min_evidence=3))
    assert other.records["p"].rank.tolist() == [5, 9, 9]  # the later edit is kept out
    assert other.records["p"].auc.tolist() == [0.5, 0.9, 0.9]
    assert other.costs["p"].guard_accepted == 1 and other.costs["p"].guard_rejected == 1
    assert harmed.costs["p"].guard_accepted == 1  # no evidence before t=0


def test_fleet_guard_policy_in_the_replay(world) -> None:
    specs = [
        PolicySpec("static"),
        PolicySpec("system", "timer", 1.0),
        PolicySpec.parse("system:timer:1.0:fleet-guard"),
    ]
    assert specs[2].label == "system timer 100% fleet-guard"
    res = run_replay(world.ds, CFG, specs, cache=world.cache, progress=False)
    g, t, s = (res.records[x.label] for x in (specs[2], specs[1], specs[0]))
    assert ((g.rank == t.rank) | (g.rank == s.rank)).all()
    c = res.costs[specs[2].label]
    assert c["guard_accepted"] + c["guard_rejected"] == c["requests"]
    # what the pooled evidence could tell: one row, every request counted once
    from recsys.replay.report import fleet_evidence_rows, summarise

    f = res.meta["fleet_evidence"][specs[2].label]
    assert f["requests_before"] + f["requests_after"] == c["requests"]
    assert 0 < f["clicks"] <= len(t.rank)  # the clicks served after some edit
    (row,) = fleet_evidence_rows(summarise(res))
    assert row["policy"] == specs[2].label and row["clicks"] == f"{f['clicks']:,}"


def test_clustered_sums_match_a_direct_computation() -> None:
    from recsys.replay.guard import _clustered_sums

    rng = np.random.default_rng(0)
    device = rng.integers(0, 5, 200)
    had = rng.random(200) < 0.7
    diff = np.where(had, rng.normal(0.01, 0.1, 200), 0.0)
    c_ss, c_sn, c_nn = _clustered_sums(device, diff, had)
    for k in (0, 1, 17, 120, 200):
        s = np.bincount(device[:k], diff[:k], minlength=5)
        n = np.bincount(device[:k], had[:k].astype(float), minlength=5)
        np.testing.assert_allclose(
            [c_ss[k], c_sn[k], c_nn[k]], [(s * s).sum(), (s * n).sum(), (n * n).sum()], atol=1e-9
        )


def test_fleet_proof_applies_edits_only_once_they_proved_to_help() -> None:
    from device_ranker.guard import benefit_test

    cfg = GuardConfig(min_evidence=3)
    assert not benefit_test(0.0, 0, 0.0, cfg)  # no evidence: keep the base head
    assert not benefit_test(0.2, 2, 0.0, cfg)  # too few clicks
    assert benefit_test(1.0, 10, 0.001, cfg)  # mean 0.1, se 0.03
    assert not benefit_test(1.0, 10, 0.01, cfg)  # mean 0.1, se 0.1: not shown
    assert not benefit_test(-1.0, 10, 0.0, cfg)


def test_one_device_cannot_prove_a_benefit_alone() -> None:
    from recsys.replay.guard import _clustered_sums

    # one device with 50 helpful clicks, three with 5 harmful ones each: the per-click
    # standard error would call the pooled mean (+) significant; clustered by device it is not
    device = np.r_[np.zeros(50, int), np.repeat([1, 2, 3], 5)]
    diff = np.r_[np.full(50, 0.05), np.full(15, -0.05)]
    had = np.ones(65, bool)
    c_ss, c_sn, c_nn = _clustered_sums(device, diff, had)
    n, total = 65, diff.sum()
    mean = total / n
    var = (c_ss[-1] - 2 * mean * c_sn[-1] + mean**2 * c_nn[-1]) / n**2
    per_click_se = diff.std(ddof=1) / np.sqrt(n)
    assert mean - 1.645 * per_click_se > 0
    assert mean - 1.645 * np.sqrt(var) <= 0


def test_fleet_proof_policy_in_the_replay(world) -> None:
    specs = [
        PolicySpec("static"),
        PolicySpec("system", "timer", 1.0),
        PolicySpec.parse("system:timer:1.0:fleet-proof"),
    ]
    assert specs[2].label == "system timer 100% fleet-proof"
    assert specs[2].fleet_guard and specs[2].fleet_proof
    res = run_replay(world.ds, CFG, specs, cache=world.cache, progress=False)
    g, t, s = (res.records[x.label] for x in (specs[2], specs[1], specs[0]))
    assert ((g.rank == t.rank) | (g.rank == s.rank)).all()
    c = res.costs[specs[2].label]
    assert c["guard_accepted"] + c["guard_rejected"] == c["requests"]
    assert c["guard_rejected"] >= 1  # every device's first request has no evidence yet


def test_a_policy_can_set_its_own_fleet_test_level() -> None:
    from recsys.replay.guard import apply_fleet_guards

    spec = PolicySpec.parse("system:timer:1.0:fleet-proof=0")
    assert spec.fleet_proof and spec.guard_z == 0.0
    assert spec.label == "system timer 100% fleet-proof z=0"
    assert PolicySpec.parse("duet:gate:1.0:fleet-guard=2.5").guard_z == 2.5
    assert PolicySpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValidationError, match="level must be a number"):
        PolicySpec.parse("system:timer:1.0:fleet-proof=high")
    with pytest.raises(ValidationError, match="fleet-guarded"):
        PolicySpec("system", guard=True, guard_z=0.0)
    # edits help one device a lot and hurt another a little: the pooled mean is positive
    # but not significant between devices, so the 5 % proof test holds the late request
    # and z = 0 (apply when the mean gain is positive) applies it
    labels = ("proof", "proof z=0")
    devs = [
        _device(0, [1, 2, 3], [2, 2, 2], [6, 6, 6], [0, 0, 0], [0], labels),
        _device(1, [4, 5, 6], [6, 6, 5], [4, 4, 4], [0, 0, 0], [0], labels),
        _device(2, [30, 31], [4, 4], [9, 9], [0, 1], [0, 20], labels),
    ]
    apply_fleet_guards(devs, GuardConfig(min_evidence=3), set(labels), {"proof z=0": 0.0})
    assert devs[2].records["proof"].rank.tolist() == [9, 9]  # both held
    assert devs[2].records["proof z=0"].rank.tolist() == [9, 4]  # the late one applied


def test_fleet_evidence_figures_say_when_the_pooled_sign_became_clear() -> None:
    from recsys.replay.guard import apply_fleet_guards, fleet_evidence_figures

    # mean -0.01, sd ~0.1: the pooled mean is one standard error from zero at ~101 clicks
    diffs = np.tile([0.09, -0.11], 50)
    f = fleet_evidence_figures(
        diffs, np.array([0, 50, 99, 150, 400]), np.array([1, 1, 0, 0, 1], bool)
    )
    assert f["clicks"] == 100 and f["requests_before"] == 3 and f["requests_after"] == 2
    np.testing.assert_allclose(
        [f["gain_per_click"], f["sd_per_click"]], [-0.01, 0.1 * np.sqrt(100 / 99)]
    )
    np.testing.assert_allclose(f["clicks_to_sign"], (f["sd_per_click"] / f["gain_per_click"]) ** 2)
    assert f["applied_before"] == pytest.approx(2 / 3) and f["applied_after"] == 0.5
    none = fleet_evidence_figures(np.zeros(5), np.array([0, 3]), np.array([True, True]))
    assert none["clicks_to_sign"] == float("inf") and np.isnan(none["applied_after"])
    # the replay returns them per fleet-guarded label, from the evidence it pooled
    harmed = _device(0, [1, 2, 3, 4], [40, 50, 30, 60], [1, 2, 1, 3], [0] * 4, [0])
    other = _device(1, [2, 21], [5, 5], [9, 9], [0, 1], [1, 20])
    out = apply_fleet_guards([harmed, other], GuardConfig(min_evidence=3))
    assert set(out) == {"p"} and out["p"]["clicks"] == 6
    assert out["p"]["requests_before"] + out["p"]["requests_after"] == 3
