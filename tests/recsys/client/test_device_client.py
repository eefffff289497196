"""The device client against a real device server (in this process, loopback, tokens
required) linked to a real tiny cloud: every method returns plain dataclasses, the token
is sent (and a missing or foreign one is a typed error), bad input is a typed error that
changes nothing, and the async client gives the same answers as the blocking one."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from recsys.client import (
    AsyncDeviceClient,
    ClientOptions,
    DeviceClient,
    DeviceStatus,
    EditOutcome,
    EventResult,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    Recommendation,
    ServingMode,
    UnauthenticatedError,
)
from recsys.errors import ValidationError
from recsys.serving.auth import issue_token


@pytest.fixture(scope="module")
def target(device) -> str:
    return f"127.0.0.1:{device.port}"


@pytest.fixture(scope="module")
def client(target, operator_token):
    with DeviceClient(target, ClientOptions(timeout_s=20, token=operator_token)) as c:
        yield c


def test_record_recommend_status_and_edit_are_dataclasses(client) -> None:
    first = None
    for n, item in enumerate(["i1", "i2", "i3", "i4"]):
        res = client.record_event("cu1", item, timestamp=100 + n, wait_for_edit=True)
        first = first or res
        assert isinstance(res, EventResult) and res.history_length == n + 1
    assert first.new_user and res.mode in set(ServingMode)
    rec = client.recommend("cu1", k=5, probe_item_ids=["i5", "i1"])
    assert isinstance(rec, Recommendation) and len(rec.items) == 5
    assert rec.item_ids == [i.item_id for i in rec.items]
    assert not {"i1", "i2", "i3", "i4"} & set(rec.item_ids)  # seen items excluded
    assert [i.score for i in rec.items] == sorted((i.score for i in rec.items), reverse=True)
    assert len(rec.probe_scores) == len(rec.probe_ranks) == 2 and min(rec.probe_ranks) >= 1
    on_candidates = client.recommend("cu1", k=2, candidates=["i7", "i8", "i9"])
    assert set(on_candidates.item_ids) <= {"i7", "i8", "i9"} and len(on_candidates.items) == 2

    edit = client.request_edit("cu1")
    assert edit.outcome is EditOutcome.APPLIED and edit.mode is ServingMode.EDITED
    assert edit.edit is not None and edit.edit.edit_id > 0 and edit.edit.source == "cloud"
    assert edit.cost is not None and edit.cost.bytes_down > 0
    status = client.status("cu1")
    assert isinstance(status, DeviceStatus) and status.ready and status.cloud_reachable
    assert status.user is not None and status.user.user_id == "cu1"
    assert status.user.edit == edit.edit and status.user.mode is ServingMode.EDITED
    assert status.user.history_length == 4 and status.num_items == 30
    assert client.status().user is None
    reverted = client.apply_edit("cu1", b"", source="test")
    assert reverted.edit is None and reverted.mode is ServingMode.BASE
    assert dataclasses.asdict(rec)["items"][0]["item_id"] == rec.item_ids[0]


def test_wrong_input_is_a_typed_error_and_changes_nothing(client) -> None:
    client.record_event("cu2", "i3", timestamp=1)

    def state() -> tuple:
        u = client.status("cu2").user
        return u.history_length, u.events_since_apply, u.edit, u.mode

    before = state()
    with pytest.raises(InvalidArgumentError) as err:  # the server's check
        client.recommend("cu2", k=0)
    assert err.value.method == "Recommend" and "k" in err.value.details
    assert isinstance(err.value, ValidationError)
    with pytest.raises(InvalidArgumentError, match="bad request field"):  # never sent
        client.recommend("cu2", k="ten")
    with pytest.raises(InvalidArgumentError):
        client.recommend("cu2", k=3, probe_item_ids=["no-such-item"])
    with pytest.raises(NotFoundError) as missing:
        client.record_event("cu2", "no-such-item", timestamp=2)
    assert "no-such-item" in str(missing.value)
    with pytest.raises(NotFoundError):
        client.recommend("nobody", k=3)
    assert state() == before


def test_the_token_is_sent_and_checked(target, key, tmp_path) -> None:
    with (
        DeviceClient(target, ClientOptions(timeout_s=20)) as anonymous,
        pytest.raises(UnauthenticatedError),
    ):
        anonymous.recommend("cu3", k=3)
    own = issue_token(key[1], "cu3", role="device")
    with DeviceClient(target, ClientOptions(timeout_s=20, token=own)) as dev:
        assert dev.record_event("cu3", "i1", timestamp=5).new_user
        with pytest.raises(PermissionDeniedError):
            dev.record_event("cu4", "i1", timestamp=5)
    # a token file: re-read when it changes (a reissued token is used from the next call)
    path = tmp_path / "cu4.token"
    path.write_text(issue_token(key[1], "cu3", role="device") + "\n")
    with DeviceClient(target, ClientOptions(timeout_s=20, token_file=str(path))) as dev:
        with pytest.raises(PermissionDeniedError):
            dev.record_event("cu4", "i1", timestamp=5)
        path.write_text(issue_token(key[1], "cu4", role="device", ttl_s=7200) + "\n")
        assert dev.record_event("cu4", "i1", timestamp=5).history_length == 1
    with pytest.raises(ValidationError, match="token"):
        ClientOptions(token="a b")


def test_async_client_answers_like_the_blocking_one(target, operator_token, client) -> None:
    # Every edit request the gate makes (min_history 2, threshold 0: from the 2nd event)
    # finishes within its RecordEvent (wait_for_edit): no background GenerateEdit can
    # land between (or during) the two Recommends and change the user's edit and mode.
    for n, item in enumerate(["i10", "i11", "i12"]):
        res = client.record_event("cu5", item, timestamp=n, wait_for_edit=True)
        assert res.outcome not in (EditOutcome.PENDING, EditOutcome.IN_FLIGHT)
    settled = client.status("cu5").user
    blocking = client.recommend("cu5", k=4, probe_item_ids=["i13"])
    assert blocking.edit == settled.edit and blocking.mode is settled.mode

    async def run() -> tuple:
        opts = ClientOptions(timeout_s=20, token=operator_token)
        async with AsyncDeviceClient(target, opts) as dev:
            rec = await dev.recommend("cu5", k=4, probe_item_ids=["i13"])
            with pytest.raises(InvalidArgumentError):
                await dev.recommend("cu5", k=0)
            status = await dev.status("cu5")
            return rec, status

    rec, status = asyncio.run(run())
    assert rec == blocking and status.user.history_length == 3
    assert status.user.edit == settled.edit and status.user.mode is settled.mode
