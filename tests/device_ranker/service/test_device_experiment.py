"""A/B arms in the device service (live traffic): per-user policies and the event log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from service_helpers import device_config

from device_ranker.service.event_log import FIELDS
from device_ranker.service.policy import ArmPolicy, TimerGate
from device_ranker.service.server import DeviceHandle, start_device
from recsys.errors import ValidationError
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc

ARMS = {
    "static": {"kind": "static"},
    "adapted": {"kind": "system", "trigger": "gate", "budget": 1.0, "threshold": 0.0},
    "timer": {"kind": "system", "trigger": "timer", "budget": 0.5},
}
STATIC_USERS = {"u10", "u11"}
TIMER_USERS = {"u14"}


def arm_of(user_id: str) -> tuple[str, dict]:
    """A test resolver: fixed users per arm (the CLI's hashes (salt, user) instead)."""
    arm = "static" if user_id in STATIC_USERS else "timer" if user_id in TIMER_USERS else "adapted"
    return arm, ARMS[arm]


@pytest.fixture(scope="module")
def exp_device(bg, artifacts, cloud, tmp_path_factory) -> Iterator[tuple[DeviceHandle, Path]]:
    log = tmp_path_factory.mktemp("events") / "events.jsonl"
    cfg = device_config(artifacts, cloud.port, experiment="unit-exp", event_log=str(log))
    handle = bg.run(start_device(cfg, arm_for=arm_of))
    yield handle, log
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def exp_stub(exp_device) -> Iterator[pb_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{exp_device[0].port}") as channel:
        yield pb_grpc.RecommendationServiceStub(channel)


def log_lines(path: Path, user: str) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [x for x in lines if x["user_id"] == user]


def record(stub, user: str, item: str, t: int, wait: bool = True) -> pb.RecordEventResponse:
    return stub.RecordEvent(
        pb.RecordEventRequest(user_id=user, item_id=item, timestamp=t, wait_for_edit=wait),
        timeout=10,
    )


def test_static_and_adapted_arms_behave_differently(exp_stub, exp_device, cloud) -> None:
    handle, log = exp_device
    requests_before = cloud.engine.requests
    device_before = handle.engine.edits.requests
    served = {}
    for n, user in enumerate(["u10", "u12"]):
        probe = exp_stub.Recommend(
            pb.RecommendRequest(user_id=user, k=3, probe_item_ids=["i20"]), timeout=10
        )
        served[user] = probe.probe_ranks[0]
        ev = record(exp_stub, user, "i20", 1000 + n)
        status = exp_stub.GetStatus(pb.GetStatusRequest(user_id=user), timeout=10)
        assert ev.arm == status.user.arm
        if user == "u10":  # static: never asks, always the base model
            assert ev.outcome == pb.EDIT_OUTCOME_NOT_REQUESTED and not ev.edit_requested
            assert not ev.HasField("cost") and ev.mode == pb.SERVING_MODE_BASE
            assert status.user.arm == "static" and not status.user.adaptive
            rec = exp_stub.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=10)
            assert rec.mode == pb.SERVING_MODE_BASE and not rec.HasField("edit")
            reply = exp_stub.RequestEdit(
                pb.RequestEditRequest(user_id=user, wait_for_edit=True), timeout=10
            )
            assert reply.outcome == pb.EDIT_OUTCOME_NOT_REQUESTED
        else:  # adapted: the gate fires (threshold 0) and the edit is applied
            assert ev.outcome == pb.EDIT_OUTCOME_APPLIED and ev.edit_requested
            assert ev.cost.bytes_up > 0 and ev.cost.bytes_down > ev.cost.payload_bytes > 0
            assert ev.cost.device_decode_us > 0 and ev.cost.device_apply_us > 0
            assert ev.mode == pb.SERVING_MODE_EDITED
            assert status.user.arm == "adapted" and status.user.adaptive
            assert status.user.trigger == "gate" and status.user.gate_threshold == 0.0
    assert handle.engine.edits.requests == device_before + 1  # only the adapted user asked
    assert cloud.engine.requests == requests_before + 1
    assert exp_stub.GetStatus(pb.GetStatusRequest(), timeout=10).experiment == "unit-exp"

    static_line, = log_lines(log, "u10")  # fmt: skip
    adapted_line, = log_lines(log, "u12")  # fmt: skip
    for line, user in ((static_line, "u10"), (adapted_line, "u12")):
        assert tuple(line) == FIELDS
        assert line["experiment"] == "unit-exp" and line["item_id"] == "i20"
        assert line["rank"] == served[user]  # the rank under the model served just before
        assert 1 <= line["rank"] <= line["num_items"] <= 30
    assert static_line["arm"] == "static" and not static_line["requested"]
    assert static_line["bytes_up"] == static_line["bytes_down"] == 0
    assert static_line["outcome"] == "not_requested" and static_line["mode"] == "base"
    assert adapted_line["arm"] == "adapted" and adapted_line["requested"]
    assert adapted_line["outcome"] == "applied" and adapted_line["bytes_down"] > 0
    assert adapted_line["timestamp"] == 1001


def test_timer_arm_requests_every_period(exp_stub, exp_device) -> None:
    _, log = exp_device
    asked = [record(exp_stub, "u14", f"i{n}", 2000 + n).edit_requested for n in range(5)]
    assert asked == [True, False, True, False, True]  # first, then every round(1/0.5) = 2
    status = exp_stub.GetStatus(pb.GetStatusRequest(user_id="u14"), timeout=10)
    assert status.user.arm == "timer" and status.user.trigger == "timer"
    assert [x["requested"] for x in log_lines(log, "u14")] == asked


def test_background_edit_is_logged_when_it_finishes(exp_stub, exp_device) -> None:
    _, log = exp_device
    ev = record(exp_stub, "u15", "i3", 3000, wait=False)
    assert ev.outcome == pb.EDIT_OUTCOME_PENDING
    deadline = time.monotonic() + 10
    while not log_lines(log, "u15") and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = log_lines(log, "u15")
    assert line["requested"] and line["outcome"] == "applied" and line["bytes_up"] > 0


def test_arm_policies_are_validated() -> None:
    assert not ArmPolicy.from_dict({"kind": "static"}).adaptive
    assert ArmPolicy.from_dict({"kind": "system", "guard": False}).adaptive  # "off" is fine
    timer = ArmPolicy.from_dict({"kind": "system", "trigger": "timer", "budget": 0.2})
    from device_ranker.gate import GateConfig

    gate = timer.make_gate(GateConfig(), None)
    assert isinstance(gate, TimerGate) and gate.period == 5
    for bad, words in [
        ({"kind": "finetune"}, "offline replay"),
        ({"kind": "magic"}, "should be .static. or .system."),
        ({"kind": "system", "trigger": "cron"}, "trigger"),
        ({"kind": "system", "budget": 1.5}, "budget"),
        ({"kind": "system", "budget": "lots"}, "bad arm policy"),
        ({"kind": "system", "guard": True}, r"sets \['guard'\].*one harm-guard setting"),
        ({"kind": "system", "guard": True, "fleet_guard": True, "guard_z": 0.0}, "abtest run"),
        ({"kind": "system", "guard_z": 0.0}, r"sets \['guard_z'\]"),  # 0.0 == False in Python
    ]:
        with pytest.raises(ValidationError, match=words):
            ArmPolicy.from_dict(bad)


def test_cli_resolver_hashes_and_persists_arms(tmp_path) -> None:
    """``serve device --experiment``'s resolver: recsys.abtest's hash, stored assignments."""
    from codebook.store import PrototypeStore
    from recsys.abtest.assignment import assign_arm
    from recsys.cli.serve_cmd import experiment_arms

    exp = tmp_path / "exp.toml"
    exp.write_text(
        'name = "live-test"\nsalt = "s1"\nprimary_metric = "ndcg@10"\n'
        "guardrail_metrics = []\n"
        '[[arms]]\nname = "static"\nweight = 0.5\npolicy = { kind = "static" }\n'
        '[[arms]]\nname = "adapted"\nweight = 0.5\n'
        'policy = { kind = "system", trigger = "gate", budget = 0.2 }\n'
    )
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    name, arm_for = experiment_arms(str(exp), url)
    pairs = [("static", 0.5), ("adapted", 0.5)]
    users = [f"u{n}" for n in range(40)]
    arms = {u: arm_for(u) for u in users}
    assert name == "live-test"
    assert all(arms[u][0] == assign_arm("s1", u, pairs) for u in users)
    assert {a for a, _ in arms.values()} == {"static", "adapted"}
    assert arms[next(u for u in users if arms[u][0] == "adapted")][1]["budget"] == 0.2
    assert experiment_arms(str(exp), url)[1]("u0") == arms["u0"]  # stable across restarts
    store = PrototypeStore.open(url)
    try:
        record = store.get_experiment("live-test")
        counts = store.arm_counts(record.id)
    finally:
        store.close()
    assert sum(counts.values()) == 40
    assert counts["static"] == sum(a == "static" for a, _ in arms.values())
