"""The harm guards in the real services (issue 15), through loopback gRPC servers.

* the device's own harm test (``--guard``): clicks scored by the base head and the
  candidate edit; a new edit after clicks its predecessor ranked worse is held (base head
  served, the edit kept as the candidate and scored in shadow);
* the cloud's fleet guard (``--fleet-guard proof|harm``): the device reports its evidence
  with GenerateEdit, the cloud pools it with other devices' and answers apply / hold,
  which the device obeys.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import cloud_config, device_config

from device_ranker.gate import GateConfig
from device_ranker.guard import GuardConfig, click_gain
from device_ranker.service.server import start_device
from llm_cloud.service.server import start_cloud
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.fleet_guard import FleetGuardConfig
from recsys.serving.server import ServerOptions

# one request when the history reaches min_history, then only RequestEdit asks
ONCE = GateConfig(min_history=2, min_gap=1, budget=0.001)


def _servers(bg, artifacts, fleet: FleetGuardConfig | None, **device_kw):
    metrics = ServerOptions(port=0, metrics_port=0)
    cloud = bg.run(
        start_cloud(
            cloud_config(artifacts, fleet_guard=fleet or FleetGuardConfig(), server=metrics)
        )
    )
    device = bg.run(
        start_device(
            device_config(
                artifacts, cloud.port, trigger="timer", gate=ONCE, server=metrics, **device_kw
            )
        )
    )
    return cloud, device


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def servers(bg, artifacts, request) -> Iterator[tuple]:
    fleet, device_kw = request.param
    cloud, device = _servers(bg, artifacts, fleet, **device_kw)
    with (
        grpc.insecure_channel(f"127.0.0.1:{device.port}") as dch,
        grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as cch,
    ):
        yield (
            cloud,
            pb_grpc.RecommendationServiceStub(dch),
            cpb_grpc.AdaptationServiceStub(cch),
            device,
        )
    bg.run(device.stop(0))
    bg.run(cloud.stop(0))


def _record(stub, user: str, item: str, t: int, wait: bool = True) -> pb.RecordEventResponse:
    return stub.RecordEvent(
        pb.RecordEventRequest(user_id=user, item_id=item, timestamp=t, wait_for_edit=wait)
    )


def _ranks(stub, user: str, items: list[str], base: bool) -> np.ndarray:
    rec = stub.Recommend(
        pb.RecommendRequest(user_id=user, k=1, probe_item_ids=items, base_model=base)
    )
    return np.asarray(rec.probe_ranks)


def _unseen(stub, user: str) -> list[str]:
    return [s.item_id for s in stub.Recommend(pb.RecommendRequest(user_id=user, k=1000)).items]


def _start_user(stub, user: str) -> pb.RecordEventResponse:
    """A new user's first two events; the second triggers its first request."""
    _record(stub, user, "i1", 1)
    return _record(stub, user, "i2", 2)


def _fake_report(cloud_stub, device: str, clicks: int, mean: float, sd: float) -> int:
    """Another device's GenerateEdit with its evidence; returns the cloud's decision."""
    total = clicks * mean
    squares = (clicks - 1) * sd * sd + clicks * mean * mean
    res = cloud_stub.GenerateEdit(
        cpb.GenerateEditRequest(
            device_id=device,
            recent_item_ids=["i1", "i4", "i7"],
            guard_evidence=cpb.GuardEvidence(
                clicks=clicks, gain_diff_sum=total, gain_diff_sum_squares=squares
            ),
        )
    )
    return res.decision


GUARD = GuardConfig(window=20, min_evidence=3, z=0.0)


@pytest.mark.parametrize("servers", [(None, {"guard": True, "guard_settings": GUARD})],
                         indirect=True)  # fmt: skip
def test_device_guard_holds_an_edit_after_clicks_its_predecessor_ranked_worse(servers) -> None:
    _, stub, _, device = servers
    first = _start_user(stub, "g1")
    assert first.outcome == pb.EDIT_OUTCOME_APPLIED  # no evidence yet: applied
    assert first.mode == pb.SERVING_MODE_EDITED
    expected = []
    for t in range(3, 8):  # clicks the served edit ranks worse than the base head
        items = _unseen(stub, "g1")
        edit_r, base_r = _ranks(stub, "g1", items, False), _ranks(stub, "g1", items, True)
        d = click_gain(edit_r) - click_gain(base_r)
        k = int(np.argmin(d))
        if d[k] >= 0:
            pytest.skip("the tiny edit ranks no unseen item worse than the base head")
        expected.append(float(d[k]))
        res = _record(stub, "g1", items[k], t)
        assert res.outcome == pb.EDIT_OUTCOME_NOT_REQUESTED
    user = stub.GetStatus(pb.GetStatusRequest(user_id="g1")).user
    assert user.guard_clicks == len(expected)
    assert user.guard_mean_gain_diff == pytest.approx(np.mean(expected), rel=1e-5)
    held = stub.RequestEdit(pb.RequestEditRequest(user_id="g1", wait_for_edit=True))
    assert held.outcome == pb.EDIT_OUTCOME_HELD
    assert held.mode == pb.SERVING_MODE_BASE and not held.HasField("edit")
    status = stub.GetStatus(pb.GetStatusRequest(user_id="g1"))
    assert (status.guard_accepted, status.guard_rejected, status.fleet_held) == (1, 1, 0)
    assert status.user.held_by == "device" and "held by the device" in status.user.note
    guarded = ("recsys_device_edits_total", (("outcome", "guarded"),))
    assert _scrape(device.server.metrics.port)[guarded] == 1
    rec = stub.Recommend(pb.RecommendRequest(user_id="g1", k=3))
    assert rec.mode == pb.SERVING_MODE_BASE
    # the held edit is the candidate: the next click is scored against it in shadow
    _record(stub, "g1", _unseen(stub, "g1")[0], 9)
    assert stub.GetStatus(pb.GetStatusRequest(user_id="g1")).user.guard_clicks == 6


@pytest.mark.parametrize(
    "servers", [(FleetGuardConfig(mode="proof", min_evidence=3), {"guard_report": True})],
    indirect=True,
)  # fmt: skip
def test_proof_guard_serves_the_base_head_until_several_devices_show_edits_help(
    servers,
) -> None:
    cloud, stub, cloud_stub, _ = servers
    first = _start_user(stub, "p1")
    assert first.outcome == pb.EDIT_OUTCOME_HELD  # no evidence: the base head
    assert first.mode == pb.SERVING_MODE_BASE
    for t, item in enumerate(_unseen(stub, "p1")[:3], start=3):
        _record(stub, "p1", item, t)  # scored against the held candidate in shadow
    user = stub.GetStatus(pb.GetStatusRequest(user_id="p1")).user
    assert user.guard_clicks == 3 and user.held_by == "fleet"
    # one helpful device is not proof (clustered variance of one cluster)
    assert _fake_report(cloud_stub, "d1", 40, 0.2, 0.05) == cpb.EDIT_DECISION_HOLD
    for d in ("d2", "d3", "d4"):
        _fake_report(cloud_stub, d, 40, 0.2, 0.05)
    res = stub.RequestEdit(pb.RequestEditRequest(user_id="p1", wait_for_edit=True))
    assert res.outcome == pb.EDIT_OUTCOME_APPLIED and res.mode == pb.SERVING_MODE_EDITED
    fleet = cloud.servicer.fleet
    assert fleet.devices >= 4 and round(fleet.n) == 160 + user.guard_clicks
    status = stub.GetStatus(pb.GetStatusRequest())
    assert status.fleet_held == 1 and status.guard_accepted == status.guard_rejected == 0


@pytest.mark.parametrize(
    "servers", [(FleetGuardConfig(mode="harm"), {"guard_report": True})], indirect=True
)
def test_harm_guard_holds_edits_once_devices_show_harm(servers) -> None:
    cloud, stub, cloud_stub, device = servers
    assert _start_user(stub, "h1").outcome == pb.EDIT_OUTCOME_APPLIED  # no evidence: apply
    assert _fake_report(cloud_stub, "d1", 50, -0.1, 0.05) == cpb.EDIT_DECISION_HOLD
    res = stub.RequestEdit(pb.RequestEditRequest(user_id="h1", wait_for_edit=True))
    assert res.outcome == pb.EDIT_OUTCOME_HELD and res.mode == pb.SERVING_MODE_BASE
    assert stub.GetStatus(pb.GetStatusRequest(user_id="h1")).user.held_by == "fleet"
    dev = _scrape(device.server.metrics.port)
    assert dev[("recsys_device_edits_total", (("outcome", "guarded"),))] == 1
    assert dev[("recsys_device_edits_total", (("outcome", "applied"),))] == 1
    cl = _scrape(cloud.server.metrics.port)
    decisions = "recsys_cloud_fleet_guard_decisions_total"
    assert cl[(decisions, (("decision", "apply"),))] == 1  # h1's first edit
    assert cl[(decisions, (("decision", "hold"),))] == 2  # d1's and h1's second
    assert cl[("recsys_cloud_fleet_guard_clicks", ())] == 50
    assert cl[("recsys_cloud_fleet_guard_devices", ())] == 1
    assert cl[("recsys_cloud_fleet_guard_mean_gain_diff", ())] == pytest.approx(-0.1)


@pytest.mark.parametrize(
    "servers", [(FleetGuardConfig(mode="harm"), {"guard_report": True})], indirect=True
)
def test_inconsistent_evidence_is_invalid_argument_and_pools_nothing(servers) -> None:
    cloud, _, cloud_stub, _ = servers
    for clicks, total, squares in [(3, 5.0, 9.0), (4, 1.0, 0.1), (2, math.nan, 0.0)]:
        with pytest.raises(grpc.RpcError) as err:
            cloud_stub.GenerateEdit(
                cpb.GenerateEditRequest(
                    device_id="bad",
                    recent_item_ids=["i1"],
                    guard_evidence=cpb.GuardEvidence(
                        clicks=clicks, gain_diff_sum=total, gain_diff_sum_squares=squares
                    ),
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "guard_evidence" in err.value.details()
    assert cloud.servicer.fleet.n == 0 and cloud.servicer.fleet.devices == 0
