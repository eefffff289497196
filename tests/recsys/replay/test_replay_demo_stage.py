"""The demo's replay stage (``recsys demo`` stage 5) is the replay core's gRPC driver on
a sample of users: real servers, the core's records (no NDCG computed by hand), the
services' costs, clean exit codes; its NDCG@10 is the in-process replay's."""

from __future__ import annotations

import argparse

import pytest

from recsys.cli import demo_cmd
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.engine import run_replay

pytestmark = pytest.mark.slow  # starts a cloud and two device servers


def test_demo_services_stage_runs_the_cores_grpc_driver(world, capsys) -> None:
    args = argparse.Namespace(
        dataset=str(world.root), data_dir=None, cache_dir=str(world.cache), threads=1
    )
    report = demo_cmd._services_stage(world.ds, args)
    printed = capsys.readouterr().out
    assert "replay through gRPC" in printed and "Recommend ms p50 / p99" in printed
    static, adapted = (report["policies"][k] for k in ("static", "system gate 20%"))
    assert static["events"] == adapted["events"] == report["stream"]["evaluated_events"] > 0
    assert static["requests"] == 0 < adapted["requests"]
    assert adapted["failed_requests"] == 0 and adapted["uplink_bytes_per_request"] > 0
    assert 0 < adapted["recommend_ms_p50"] <= adapted["recommend_ms_p99"]
    assert all(s["exit_code"] == 0 for s in report["servers"].values())
    assert set(report["servers"]) == {"cloud", "static", "system gate 20%"}
    cfg = ReplayConfig(max_users=demo_cmd.DEMO_REPLAY_USERS, max_events=demo_cmd.DEMO_MAX_EVENTS)
    gate = PolicySpec(kind="system", trigger="gate", budget=0.2)
    local = run_replay(
        world.ds, cfg, [PolicySpec(kind="static"), gate], cache=world.cache, progress=False
    )
    for label, remote in (("static", static), (gate.label, adapted)):
        want = local.records[label].summary()["ndcg@10"]
        assert remote["ndcg@10"] == pytest.approx(want, abs=1e-5), label
    assert adapted["requests"] == local.costs[gate.label]["requests"]
