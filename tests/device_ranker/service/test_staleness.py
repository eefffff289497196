"""Staleness of a device's edit (issue 13): its age in events and seconds across applies
and reverts, the fit signal (ranks the current edit gave the last K clicks), and the
optional staleness request rule (off by default: the gate alone decides)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from service_helpers import device_config

from device_ranker.gate import GateConfig
from device_ranker.service.engine import click_rank
from device_ranker.service.policy import Staleness, StalenessConfig, stale_reason
from device_ranker.service.server import DeviceHandle, start_device
from recsys.edit_payload import encode_payload
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc

T0 = 10_000  # event clock of the test events (after every seeded event)


@pytest.fixture(scope="module")
def local(bg, artifacts) -> Iterator[tuple[DeviceHandle, pb_grpc.RecommendationServiceStub]]:
    """A device without a cloud (edits are pushed), ranking each of the last 3 clicks."""
    staleness = StalenessConfig(fit_clicks=3, fit_every_click=True)
    handle = bg.run(start_device(device_config(artifacts, staleness=staleness)))
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield handle, pb_grpc.RecommendationServiceStub(channel)
    bg.run(handle.stop(0))


def status(stub, user: str) -> pb.UserStatus:
    return stub.GetStatus(pb.GetStatusRequest(user_id=user), timeout=10).user


def record(stub, user: str, item: str, t: int, **kw) -> pb.RecordEventResponse:
    return stub.RecordEvent(
        pb.RecordEventRequest(user_id=user, item_id=item, timestamp=t, **kw), timeout=10
    )


def bias_edit(handle: DeviceHandle, items: list[int], sign: float) -> bytes:
    """A last-layer bias edit that moves every query towards (+1) or away from (-1) the
    mean vector of ``items``, at the device's bias bound."""
    ranker = handle.engine.ranker
    name = ranker.model.head.layer_names()[-1]
    direction = ranker.model.item_table.detach()[items].mean(0).sign()  # [D]
    bound = 0.95 * ranker.bounds.max_bias_abs
    return encode_payload({f"{name}.bias": sign * bound * direction}, dtype="fp32")


def test_ages_count_across_applies_and_reverts(local) -> None:
    handle, stub = local
    user = "u3"  # a seeded user: the base model is current since seeding
    s = status(stub, user)
    assert s.events_since_apply == 0 and s.edit_age_clock == "event" and s.fit_clicks == 0
    assert math.isnan(s.fit_mrr)
    for k in range(3):
        record(stub, user, f"i{k}", T0 + 60 * k)
    s = status(stub, user)
    last_seeded = handle.engine.users[user].staleness.applied_event_time
    assert s.events_since_apply == 3
    assert s.edit_age_seconds == pytest.approx(T0 + 120 - last_seeded)
    payload = bias_edit(handle, [1, 2], +1.0)
    stub.ApplyEdit(pb.ApplyEditRequest(user_id=user, edit_payload=payload), timeout=10)
    s = status(stub, user)
    assert (s.events_since_apply, s.edit_age_seconds, s.fit_clicks) == (0, 0.0, 0)
    record(stub, user, "i5", T0 + 200)
    record(stub, user, "i6", T0 + 500)
    s = status(stub, user)
    assert (s.events_since_apply, s.edit_age_seconds) == (2, 500 - 120)
    assert s.edit.edit_id >= 1 and s.fit_clicks == 2
    stub.ApplyEdit(pb.ApplyEditRequest(user_id=user, edit_payload=b""), timeout=10)  # revert
    s = status(stub, user)
    assert (s.events_since_apply, s.edit_age_seconds, s.fit_clicks) == (0, 0.0, 0)
    assert not s.HasField("edit")
    record(stub, user, "i7", T0 + 560)
    s = status(stub, user)
    assert (s.events_since_apply, s.edit_age_seconds, s.fit_clicks) == (1, 60.0, 1)


def test_age_falls_back_to_wall_time_without_an_event_clock(local) -> None:
    _, stub = local
    record(stub, "clockless", "i3", 0)  # a new user whose events carry no time
    record(stub, "clockless", "i4", 0)
    s = status(stub, "clockless")
    assert s.edit_age_clock == "wall" and 0.0 <= s.edit_age_seconds < 60.0
    assert s.events_since_apply == 2


def test_fit_ranks_are_the_served_ranks(local) -> None:
    """With a Recommend before the click the device reuses its scores; without, it makes
    one scoring pass: both give the rank a probe of that Recommend gets."""
    handle, stub = local
    user, ranks = "u4", []
    payload = bias_edit(handle, [0, 5], +1.0)
    stub.ApplyEdit(pb.ApplyEditRequest(user_id=user, edit_payload=payload), timeout=10)
    for k, item in enumerate(["i10", "i11", "i12"]):
        rec = stub.Recommend(pb.RecommendRequest(user_id=user, k=1, probe_item_ids=[item]))
        ranks.append(rec.probe_ranks[0])
        if k == 1:  # a base-model answer must not stand in for the served model's scores
            stub.Recommend(pb.RecommendRequest(user_id=user, k=1, base_model=True))
        record(stub, user, item, T0 + k)
    s = status(stub, user)
    assert s.fit_clicks == 3 and s.fit_mean_rank == pytest.approx(np.mean(ranks))
    assert s.fit_mrr == pytest.approx(np.mean(1.0 / np.asarray(ranks)))
    rec = stub.Recommend(pb.RecommendRequest(user_id=user, k=1, probe_item_ids=["i13"]))
    record(stub, user, "i13", T0 + 9)  # K = 3: the oldest click drops
    s = status(stub, user)
    assert s.fit_mean_rank == pytest.approx(np.mean([*ranks[1:], rec.probe_ranks[0]]))


def test_default_fit_counts_only_ranked_clicks(bg, artifacts) -> None:
    """The default device ranks a click only from the scores of a preceding Recommend
    (no extra pass): a click nothing ranked is not counted."""
    handle = bg.run(start_device(device_config(artifacts)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            _default_fit(pb_grpc.RecommendationServiceStub(channel))
    finally:
        bg.run(handle.stop(0))


def _default_fit(stub) -> None:
    record(stub, "u11", "i20", T0)
    assert status(stub, "u11").fit_clicks == 0
    rec = stub.Recommend(pb.RecommendRequest(user_id="u11", k=1, probe_item_ids=["i21"]))
    record(stub, "u11", "i21", T0 + 1)
    s = status(stub, "u11")
    assert s.fit_clicks == 1 and s.fit_mean_rank == rec.probe_ranks[0]


def test_fit_tells_a_bad_edit_from_a_good_one(local) -> None:
    handle, stub = local
    clicks = [7, 8, 9]
    fits = {}
    for user, sign in (("u8", +1.0), ("u9", -1.0)):
        payload = bias_edit(handle, clicks, sign)
        stub.ApplyEdit(pb.ApplyEditRequest(user_id=user, edit_payload=payload), timeout=10)
        for k, item in enumerate(clicks):
            record(stub, user, f"i{item}", T0 + k)
        s = status(stub, user)
        fits[sign] = (s.fit_mrr, s.fit_mean_rank)
    assert fits[+1.0][0] > fits[-1.0][0] and fits[+1.0][1] < fits[-1.0][1], fits


def test_click_rank_matches_the_probe_formula() -> None:
    scores = torch.tensor([0.5, 2.0, 1.0, 1.0, -1.0])
    assert click_rank(scores, 2, set()) == 3  # items 1, 2, 3 score >= 1.0
    assert click_rank(scores, 2, {1}) == 2
    assert click_rank(scores, 2, {2, 3}) == 2  # a seen click still counts itself
    assert click_rank(scores, 1, {0, 2, 3, 4}) == 1


def test_stale_reason_rules() -> None:
    s = Staleness(applied_event_time=100)
    off = StalenessConfig()
    assert not off.rule_on and stale_reason(off, s, 10**9) is None  # off by default
    s.events = 4
    assert stale_reason(StalenessConfig(max_events=5), s) is None
    s.events = 5
    assert stale_reason(StalenessConfig(max_events=5), s) == "stale-events"
    assert stale_reason(StalenessConfig(max_seconds=50), s, 140) is None
    assert stale_reason(StalenessConfig(max_seconds=50), s, 150) == "stale-time"
    fit = StalenessConfig(min_fit_mrr=0.2, min_fit_clicks=2)
    s.ranks.extend([10])
    assert stale_reason(fit, s) is None  # one click: too few to judge
    s.ranks.extend([10])
    assert stale_reason(fit, s) == "stale-fit"
    s.ranks.clear()
    s.ranks.extend([1, 2])
    assert stale_reason(fit, s) is None
    wall = Staleness(applied_wall=time.time() - 30)
    age, clock = wall.age_seconds(None)
    assert clock == "wall" and 29 <= age < 60


def test_staleness_rule_adds_requests_only_when_configured(bg, artifacts, cloud) -> None:
    """A gate that asks only once (a fixed threshold no shift reaches); the default device
    asks exactly when the gate does, the one with ``max_events=3`` every 3 events after."""
    gate = GateConfig(min_history=2, min_gap=1, threshold=1.0, budget=1.0)
    requested = {}
    for name, staleness in (
        ("default", StalenessConfig()),
        ("rule", StalenessConfig(max_events=3)),
    ):
        handle = bg.run(
            start_device(device_config(artifacts, cloud.port, gate=gate, staleness=staleness))
        )
        try:
            with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                stub = pb_grpc.RecommendationServiceStub(channel)
                replies = [
                    record(stub, "u10", f"i{k}", T0 + k, wait_for_edit=True) for k in range(10)
                ]
                requested[name] = [r.edit_requested for r in replies]
                assert all(
                    r.outcome in (pb.EDIT_OUTCOME_APPLIED, pb.EDIT_OUTCOME_NOT_REQUESTED)
                    for r in replies
                )
        finally:
            bg.run(handle.stop(0))
    assert requested["default"] == [True] + [False] * 9
    assert requested["rule"] == [True, False, False, True, False, False, True, False, False, True]
