"""The device server with per-device tokens (issue 16): a device token acts for its own
user only, an operator token for any; missing, expired and forged tokens are
UNAUTHENTICATED; rejected calls change nothing. Also: the device's own token on the cloud
link (the cloud serves only that device), the link re-reading a reissued token, undecodable
requests (INVALID_ARGUMENT) and hashed user ids in INFO logs."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import cloud_config, device_config

from device_ranker.edits import random_edit
from device_ranker.service.cloud_link import warn_if_expiring
from device_ranker.service.config import CloudLinkConfig
from device_ranker.service.server import DeviceHandle, start_device
from llm_cloud.service.server import CloudHandle, start_cloud
from recsys.edit_payload import encode_payload
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.auth import AuthConfig, issue_token, token_expiry, token_metadata
from recsys.serving.keys import SigningKey, generate_key, write_key
from recsys.serving.redact import id_ref


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> tuple[Path, SigningKey]:
    path = tmp_path_factory.mktemp("keys") / "k1.key"
    key = generate_key("k1")
    write_key(key, path)
    return path, key


@pytest.fixture(scope="module")
def secured_cloud(bg, artifacts, key, tmp_path_factory) -> Iterator[tuple[CloudHandle, Path]]:
    store = tmp_path_factory.mktemp("cloud") / "store.sqlite"
    cfg = cloud_config(artifacts, store, auth=AuthConfig(keys=(str(key[0]),)))
    handle = bg.run(start_cloud(cfg))
    yield handle, store
    bg.run(handle.stop(0))


def _token_file(directory: Path, token: str) -> Path:
    path = directory / f"{time.monotonic_ns()}.token"
    path.write_text(token + "\n")
    return path


@pytest.fixture(scope="module")
def secured(bg, artifacts, key, secured_cloud, tmp_path_factory) -> Iterator[DeviceHandle]:
    """A device server with auth, whose link holds an operator token (it hosts many users)."""
    link_token = _token_file(
        tmp_path_factory.mktemp("tok"), issue_token(key[1], "edge-1", role="operator")
    )
    cfg = device_config(
        artifacts,
        auth=AuthConfig(keys=(str(key[0]),)),
        cloud=CloudLinkConfig(target=f"127.0.0.1:{secured_cloud[0].port}", deadline_s=5.0,
                              probe_interval_s=0.2, token_file=str(link_token)),
    )  # fmt: skip
    handle = bg.run(start_device(cfg))
    yield handle
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def stub(secured) -> Iterator[pb_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        yield pb_grpc.RecommendationServiceStub(channel)


def store_rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the SQLite store."""
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def as_(token: str | None) -> dict:
    return {"timeout": 10, "metadata": token_metadata(token)}


def operator(key) -> str:
    return issue_token(key[1], "ops", role="operator")


def snapshot(stub, key, user: str) -> tuple:
    """What a call for ``user`` could change: its status, its ranking, the device counters."""
    st = stub.GetStatus(pb.GetStatusRequest(user_id=user), **as_(operator(key)))
    rec = stub.Recommend(pb.RecommendRequest(user_id=user, k=5), **as_(operator(key)))
    u = st.user
    return (
        u.history_length, u.mode, u.edit.SerializeToString(), u.events_since_apply,
        u.bytes_up, st.num_users, st.users_with_edit, st.edit_requests,
        [(i.item_id, i.score) for i in rec.items],
    )  # fmt: skip


def payload(device: DeviceHandle) -> bytes:
    edit = random_edit(device.engine.ranker.model.head, rank=2, scale=0.3, bias=False,
                       generator=torch.Generator().manual_seed(3))  # fmt: skip
    return encode_payload(edit.to_flat())


def rejected(call, request, token) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(request, **as_(token))
    return err.value.code()


def test_device_token_acts_for_its_own_user(stub, secured, key) -> None:
    mine = issue_token(key[1], "u1")
    reply = stub.ApplyEdit(pb.ApplyEditRequest(user_id="u1", edit_payload=payload(secured)),
                           **as_(mine))  # fmt: skip
    assert reply.edit.edit_id >= 1
    ev = stub.RecordEvent(pb.RecordEventRequest(user_id="u1", item_id="i3", timestamp=5,
                                                wait_for_edit=True), **as_(mine))  # fmt: skip
    assert ev.history_length >= 1
    assert stub.Recommend(pb.RecommendRequest(user_id="u1", k=3), **as_(mine)).items
    assert stub.GetStatus(pb.GetStatusRequest(user_id="u1"), **as_(mine)).user.user_id == "u1"
    assert stub.GetStatus(pb.GetStatusRequest(), **as_(mine)).ready  # device-wide: any token
    stub.ApplyEdit(pb.ApplyEditRequest(user_id="u1", edit_payload=b""), **as_(mine))  # revert


def test_operator_acts_for_any_user(stub, secured, key) -> None:
    ops = operator(key)
    for user in ("u2", "u3"):
        reply = stub.ApplyEdit(
            pb.ApplyEditRequest(user_id=user, edit_payload=payload(secured)), **as_(ops)
        )
        assert reply.mode == pb.SERVING_MODE_EDITED
        stub.ApplyEdit(pb.ApplyEditRequest(user_id=user, edit_payload=b""), **as_(ops))


def test_impersonation_is_permission_denied_and_changes_nothing(stub, secured, key) -> None:
    attacker = issue_token(key[1], "u9")
    before = snapshot(stub, key, "u4")
    calls = [
        (stub.ApplyEdit, pb.ApplyEditRequest(user_id="u4", edit_payload=payload(secured))),
        (stub.ApplyEdit, pb.ApplyEditRequest(user_id="u4", edit_payload=b"")),  # revert
        (
            stub.RecordEvent,
            pb.RecordEventRequest(user_id="u4", item_id="i2", timestamp=9, wait_for_edit=True),
        ),
        (stub.RequestEdit, pb.RequestEditRequest(user_id="u4", wait_for_edit=True)),
        (stub.Recommend, pb.RecommendRequest(user_id="u4", k=5)),
        (stub.GetStatus, pb.GetStatusRequest(user_id="u4")),
    ]
    for call, request in calls:
        assert rejected(call, request, attacker) == grpc.StatusCode.PERMISSION_DENIED, request
    assert snapshot(stub, key, "u4") == before
    # nor can it create another user by recording an event for it
    users = stub.GetStatus(pb.GetStatusRequest(), **as_(operator(key))).num_users
    new = pb.RecordEventRequest(user_id="someone-else", item_id="i2", timestamp=9)
    assert rejected(stub.RecordEvent, new, attacker) == grpc.StatusCode.PERMISSION_DENIED
    assert stub.GetStatus(pb.GetStatusRequest(), **as_(operator(key))).num_users == users


@pytest.mark.parametrize("how", ["missing", "expired", "forged", "unknown-kid", "not-bearer"])
def test_unauthenticated_apply_edit_changes_nothing(stub, secured, key, how) -> None:
    token = {
        "missing": None,
        "expired": issue_token(key[1], "u5", ttl_s=10, now=time.time() - 3600),
        "forged": issue_token(generate_key("k1"), "u5", role="operator"),
        "unknown-kid": issue_token(generate_key("k7"), "u5"),
        "not-bearer": "x",
    }[how]
    before = snapshot(stub, key, "u5")
    metadata = (("authorization", "Basic dTU6cHc="),) if how == "not-bearer" else None
    with pytest.raises(grpc.RpcError) as err:
        stub.ApplyEdit(
            pb.ApplyEditRequest(user_id="u5", edit_payload=payload(secured)),
            timeout=10,
            metadata=metadata or token_metadata(token),
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    for call, request in (
        (stub.RecordEvent, pb.RecordEventRequest(user_id="u5", item_id="i2", timestamp=9)),
        (stub.RequestEdit, pb.RequestEditRequest(user_id="u5", wait_for_edit=True)),
        (stub.Recommend, pb.RecommendRequest(user_id="u5", k=5)),
    ):
        assert rejected(call, request, token) == grpc.StatusCode.UNAUTHENTICATED
    assert snapshot(stub, key, "u5") == before


def test_health_stays_open(secured) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_undecodable_request(secured, key) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        raw = channel.unary_unary("/recsys.device.v1.RecommendationService/ApplyEdit")
        with pytest.raises(grpc.RpcError) as err:  # authentication comes first
            raw(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", timeout=10, metadata=token_metadata(issue_token(key[1], "u1")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in err.value.details()


def test_operator_link_gets_edits_and_info_logs_hash_user_ids(stub, key, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    ev = stub.RecordEvent(
        pb.RecordEventRequest(user_id="new-user-7", item_id="i1", timestamp=10**9,
                              wait_for_edit=True), **as_(operator(key)),
    )  # fmt: skip
    assert ev.new_user
    ev = stub.RecordEvent(
        pb.RecordEventRequest(user_id="u6", item_id="i0", timestamp=10**9, wait_for_edit=True),
        **as_(operator(key)),
    )
    assert ev.outcome == pb.EDIT_OUTCOME_APPLIED
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(id_ref("new-user-7") in m for m in info)
    assert not any("new-user-7" in m for m in info), info


def test_a_device_token_on_the_link_gets_its_own_edits_only(
    bg, artifacts, key, secured_cloud, tmp_path
) -> None:
    """One device (user u7) with its own token: its edits come; another user's request is
    PERMISSION_DENIED by the cloud (a failed request, the store unchanged); a reissued
    token file is picked up without a restart."""
    cloud, store = secured_cloud
    token_file = tmp_path / "device.token"
    token_file.write_text(issue_token(key[1], "u7") + "\n")
    cfg = device_config(
        artifacts,
        cloud=CloudLinkConfig(target=f"127.0.0.1:{cloud.port}", deadline_s=5.0,
                              probe_interval_s=0.1, token_file=str(token_file)),
    )  # fmt: skip
    device = bg.run(start_device(cfg))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
            dstub = pb_grpc.RecommendationServiceStub(channel)

            def event(user: str, t: int) -> pb.RecordEventResponse:
                return dstub.RecordEvent(
                    pb.RecordEventRequest(user_id=user, item_id="i4", timestamp=t,
                                          wait_for_edit=True), timeout=10,
                )  # fmt: skip

            assert event("u7", 10**9).outcome == pb.EDIT_OUTCOME_APPLIED
            assert cloud.writer is None or cloud.writer.flush(10)  # u7's rows are written
            before = store_rows(store)
            other = event("u8", 10**9)
            assert other.outcome == pb.EDIT_OUTCOME_FAILED
            status = dstub.GetStatus(pb.GetStatusRequest(user_id="u8"), timeout=10)
            assert "PERMISSION_DENIED" in status.user.note
            assert cloud.writer is None or cloud.writer.flush(10)
            assert store_rows(store) == before
            # reissue the file for u8 (a re-provisioned device): no restart needed
            token_file.write_text(issue_token(key[1], "u8", ttl_s=7200) + "\n")
            time.sleep(0.5)
            assert event("u8", 10**9 + 1).outcome == pb.EDIT_OUTCOME_APPLIED
    finally:
        bg.run(device.stop(0))


def test_the_link_warns_before_its_token_expires(caplog) -> None:
    key = generate_key("k1")
    soon = issue_token(key, "d", ttl_s=600)
    assert abs(token_expiry(soon) - (time.time() + 600)) < 5
    assert token_expiry("junk") is None

    def reminders() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "cloud token in" in r.getMessage()]

    warn_if_expiring(issue_token(key, "d", ttl_s=7 * 86400), "far.token")
    assert not reminders()
    warn_if_expiring(soon, "soon.token")
    warn_if_expiring(issue_token(key, "d", ttl_s=10, now=time.time() - 100), "old.token")
    assert [r.levelname for r in reminders()] == ["WARNING", "ERROR"]
    assert "soon.token" in reminders()[0].getMessage()
