"""``recsys replay --via grpc``: the same stream through the REAL services (cloud and one
device server per policy, child processes on loopback) gives the in-process replay's
metrics, for the same seed and users; the parity mode of the CLI and the live A/B mode
run through the same driver.

The world is tiny and built here in seconds: users walking a 30-item catalogue, a ranker
trained on the time split's training period, 2-level semantic IDs, and an adaptor (recent-
item tokens, 3 prototypes) trained by the real ``train_adaptor`` workflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_world import train_tiny_world

from codebook.prototypes import PrototypeConfig
from recsys.data import Dataset, write_dataset
from recsys.data.registry import load_dataset
from recsys.errors import ValidationError
from recsys.replay.config import GrpcOptions, PolicySpec, ReplayConfig
from recsys.replay.engine import run_replay
from recsys.replay.parity import parity_rows

pytestmark = pytest.mark.slow

NUM_ITEMS = 30
POLICIES = [
    PolicySpec("static"),
    PolicySpec("system", "gate", 0.5),
    PolicySpec("system", "timer", 1 / 3),
]


def walk_dataset(num_users: int = 36, late_users: int = 8, length: int = 18) -> Dataset:
    """Users walk the catalogue in steps of 1, 2 or 3, all at the same pace (so the replay
    period holds the last events of everyone); the last ``late_users`` start later (new
    or short-history devices in the replay period)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(num_users):
        step = 1 + u % 3
        start = int(rng.integers(NUM_ITEMS))
        late = 10 if u >= num_users - late_users else 0  # late users start 10 steps later
        seq = list(dict.fromkeys((start + step * i) % NUM_ITEMS for i in range(length)))
        rows += [(f"u{u}", f"i{item}", 100 * (i + late) + u) for i, item in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(NUM_ITEMS)]})
    return Dataset("walk", items, inter)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    """(dataset, cache dir holding the time-split ranker, codebook and adaptor artefact)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("replay-grpc")
    ds = load_dataset(write_dataset(walk_dataset(), root / "walk"))
    cache = root / "cache"
    prototypes = PrototypeConfig(num_prototypes=3, residual_rank=2, refine_every=2)
    train_tiny_world(ds, cache, epochs=3, prototypes=prototypes)
    return ds, cache


def test_grpc_replay_matches_in_process(world) -> None:
    ds, cache = world
    cfg = ReplayConfig(negatives=8, max_users=10, seed=3)
    local = run_replay(ds, cfg, POLICIES, cache=cache, progress=False)
    remote = run_replay(ds, cfg, POLICIES, cache=cache, progress=False, via="grpc")
    static = local.records["static"]
    assert len(static) >= 20 and len(np.unique(static.user)) >= 5
    summary = remote.meta["stream"]
    assert summary["evaluated_warm_user_events"] and summary["evaluated_cold_user_events"]
    for spec in POLICIES:
        a, b = local.records[spec.label], remote.records[spec.label]
        assert len(a) == len(b), spec.label
        np.testing.assert_array_equal(a.user, b.user)
        np.testing.assert_array_equal(a.item, b.item)
        np.testing.assert_array_equal(a.requested, b.requested, err_msg=spec.label)
        # same ranks, except where two items' scores are within float rounding of each
        # other (the two paths batch the encoder and the head differently, ~1e-7 apart)
        moved = int((a.rank != b.rank).sum())
        assert moved <= 1, (spec.label, a.rank, b.rank)
        if not moved:
            assert abs(a.summary()["ndcg@10"] - b.summary()["ndcg@10"]) < 1e-5
        np.testing.assert_allclose(a.auc, b.auc, atol=1e-5, err_msg=spec.label)
    for spec in POLICIES[1:]:
        rec, cost = remote.records[spec.label], remote.costs[spec.label]
        assert rec.requested.any() and cost["requests"] >= rec.requested.sum()
        assert cost["failed_requests"] == 0 and cost["initial_requests"] >= 1
        assert cost["uplink_bytes_per_request"] > 0 and cost["device_us_per_event"] > 0
        assert cost["downlink_bytes_per_request"] > cost["payload_bytes_per_request"] > 0
        assert local.costs[spec.label]["requests"] == cost["requests"]
        # the edits reach the ranking: some targets move against the static model
        assert (rec.rank != static.rank).any(), spec.label
        assert cost["prototype_downloads"] >= 1 and np.isnan(cost["device_flops_per_event"])
    assert remote.costs["static"]["requests"] == 0
    for spec in POLICIES:  # the services' own figures
        cost = remote.costs[spec.label]
        assert 0 < cost["recommend_ms_p50"] <= cost["recommend_ms_p99"]
        assert cost["record_event_ms_p50"] > 0 and cost["fallback_answers"] == 0
        assert cost["device_server_cpu_us_per_event"] > 0
        assert remote.meta["servers"][spec.label]["exit_code"] == 0
        assert remote.meta["servers"][spec.label]["startup_s"] > 0
        assert "recommend_ms_p50" not in local.costs[spec.label]
    assert remote.meta["servers"]["cloud"]["exit_code"] == 0
    rows = {r["policy"]: r for r in parity_rows(local, remote)}
    assert set(rows) == {s.label for s in POLICIES}
    assert all(r["request differs"] == 0 and r["rank differs"] <= 1 for r in rows.values())
    assert remote.meta["via"] == "grpc"
    assert remote.meta["gate"] == local.meta["gate"]  # the same calibrated thresholds
    assert "/tmp" not in str(remote.meta["servers"])


@pytest.mark.parametrize(
    "spec",
    [PolicySpec(kind="finetune"), PolicySpec(kind="system", trigger="timer", prototypes=False)],
)
def test_grpc_replay_rejects_policies_without_a_service(world, spec) -> None:
    ds, cache = world
    with pytest.raises(ValidationError, match="in process"):
        run_replay(ds, ReplayConfig(max_users=2), [spec], cache=cache, progress=False, via="grpc")


def test_cli_parity_mode(world, tmp_path, capsys) -> None:
    """``recsys replay --parity``: both drivers on the same users, one table each."""
    import json

    from recsys.cli import main

    _, cache = world
    out = tmp_path / "parity.json"
    rc = main(["replay", "--dataset", str(cache.parent / "walk"), "--cache-dir", str(cache),
               "--parity", "--policies", "static", "--max-users", "3", "--negatives", "8",
               "--no-progress", "--json", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "Replay parity on walk" in printed and "Costs: in process" in printed
    res = json.loads(out.read_text())
    (row,) = res["parity"]
    assert row["policy"] == "static" and row["rank differs"] <= 1 and row["events"] > 0
    assert res["servers"]["static"]["exit_code"] == 0 and "cloud" not in res["servers"]


def test_grpc_options_reach_the_services(world) -> None:
    """max_events keeps each device's first events; a non-strict run keeps going."""
    ds, cache = world
    cfg = ReplayConfig(negatives=8, max_users=4, max_events=3, seed=3)
    opts = GrpcOptions(concurrency=2, strict=False, cloud_deadline_s=30.0, rpc_timeout_s=60.0)
    spec = PolicySpec(kind="system", trigger="timer", budget=0.5)
    run = run_replay(ds, cfg, [spec], cache=cache, progress=False, via="grpc", grpc=opts)
    rec = run.records[spec.label]
    assert max(np.bincount(rec.user)) <= 3 and run.meta["concurrency"] == 2
    assert "--cloud-deadline" in run.meta["servers"][spec.label]["argv"]
    argv = run.meta["servers"][spec.label]["argv"]
    assert argv[argv.index("--cloud-deadline") + 1] == "30.0"


def test_live_experiment_traffic_through_one_device(world, tmp_path) -> None:
    """Live A/B: users get their arm from the device (hash + store), the static arm never
    asks the cloud, and the event log is what `recsys abtest analyze --events` reads."""
    import json

    from device_ranker.service.event_log import FIELDS
    from recsys.abtest.eventlog import read_event_log
    from recsys.abtest.experiment import load_experiment
    from recsys.replay.live import run_live_experiment

    ds, cache = world
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(
        'name = "live"\nsalt = "s"\ncontrol = "static"\nprimary_metric = "ndcg@10"\n'
        "guardrail_metrics = []\n"
        '[[arms]]\nname = "static"\nweight = 0.5\npolicy = { kind = "static" }\n'
        '[[arms]]\nname = "adapted"\nweight = 0.5\n'
        'policy = { kind = "system", trigger = "timer", budget = 0.5 }\n'
    )
    log = tmp_path / "events.jsonl"
    info = run_live_experiment(
        ds, ReplayConfig(max_users=12, seed=1), exp_file, log, cache=cache, progress=False
    )
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == info["events"] > 0 and all(tuple(x) == FIELDS for x in lines)
    exp = load_experiment(exp_file)
    arms = {x["user_id"]: x["arm"] for x in lines}
    assert all(exp.assign(u).name == a for u, a in arms.items())
    assert set(arms.values()) == {"static", "adapted"}
    static = [x for x in lines if x["arm"] == "static"]
    adapted = [x for x in lines if x["arm"] == "adapted"]
    assert not any(x["requested"] or x["bytes_up"] for x in static)
    assert any(x["requested"] and x["bytes_down"] > 0 for x in adapted)
    assert info["edit_requests"] >= sum(x["requested"] for x in adapted)
    assert info["failed_requests"] == 0 and info["experiment"] == "live"
    _, _, read = read_event_log(log, exp)
    assert read["assignment_mismatches"] == 0
    short = sum(x["history_len"] < read["min_history"] for x in lines)
    assert read["short_history_lines"] == short and read["events"] == len(lines) - short > 0
