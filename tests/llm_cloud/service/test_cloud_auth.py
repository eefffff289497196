"""The cloud with per-device tokens (issue 16): impersonation, expiry, forgery, rotation,
and that a rejected call changes nothing in the store or the prototype bank; plus
undecodable requests (INVALID_ARGUMENT) and edit ids that keep increasing across restarts."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from cloud_helpers import start
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_cloud.service.server import CloudHandle
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.serving.auth import AuthConfig, issue_token, token_metadata
from recsys.serving.keys import generate_key, write_key

GENERATE = "/recsys.cloud.v1.AdaptationService/GenerateEdit"


def request(device: str) -> cpb.GenerateEditRequest:
    return cpb.GenerateEditRequest(device_id=device, recent_item_ids=["i1", "i4", "i7"])


def store_rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the SQLite store."""
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def state(cloud: CloudHandle, store: Path) -> tuple:
    """The store's rows, the bank's assignments and pending codes, the engine's counters
    (after the write-behind writer wrote what was queued)."""
    if cloud.writer is not None:
        assert cloud.writer.flush(10)
    bank = cloud.engine.bank
    live = {pid: (lv.version, len(lv.pending_codes)) for pid, lv in bank.live.items()}
    return store_rows(store), dict(bank._assigned), live, cloud.engine.requests


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, object]:
    """A key directory holding one key, and that key."""
    directory = tmp_path_factory.mktemp("keys")
    key = generate_key("k1")
    write_key(key, directory / "k1.key")
    return directory, key


@pytest.fixture(scope="module")
def secured(bg, catalogue, keys, tmp_path_factory) -> Iterator[tuple[CloudHandle, Path]]:
    store = tmp_path_factory.mktemp("store") / "s.sqlite"
    handle = start(bg, catalogue, store, auth=AuthConfig(keys=(str(keys[0]),), reload_s=0.05))
    yield handle, store
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def channel(secured) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{secured[0].port}") as ch:
        yield ch


def call(channel: grpc.Channel, req: cpb.GenerateEditRequest, token: str | None):
    return cpb_grpc.AdaptationServiceStub(channel).GenerateEdit(
        req, timeout=10, metadata=token_metadata(token)
    )


def test_own_device_and_operator_are_served(secured, channel, keys) -> None:
    key = keys[1]
    reply = call(channel, request("dev-a"), issue_token(key, "dev-a"))
    assert reply.edit_payload and reply.edit_id >= 1
    ops = issue_token(key, "ops", role="operator")
    assert call(channel, request("dev-b"), ops).edit_payload  # an operator acts for any
    listing = cpb_grpc.AdaptationServiceStub(channel).ListPrototypes(
        cpb.ListPrototypesRequest(), timeout=10, metadata=token_metadata(issue_token(key, "x"))
    )
    assert listing.prototypes


def test_impersonation_is_denied_and_changes_nothing(secured, channel, keys) -> None:
    cloud, store = secured
    call(channel, request("victim"), issue_token(keys[1], "victim"))  # the victim's assignment
    before = state(cloud, store)
    with pytest.raises(grpc.RpcError) as err:
        call(channel, request("victim"), issue_token(keys[1], "attacker"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "attacker" not in err.value.details()
    assert state(cloud, store) == before


@pytest.mark.parametrize("how", ["missing", "expired", "forged", "tampered", "none-alg", "junk"])
def test_bad_tokens_are_unauthenticated_and_change_nothing(secured, channel, keys, how) -> None:
    cloud, store = secured
    key = keys[1]
    token = {
        "missing": None,
        "expired": issue_token(key, "dev-a", ttl_s=60, now=time.time() - 3600),
        "forged": issue_token(generate_key("k1"), "dev-a"),  # same kid, another secret
        "tampered": _tamper(issue_token(key, "dev-a", role="device"), key),
        "none-alg": jwt.encode(
            {
                "sub": "dev-a",
                "role": "operator",
                "iat": int(time.time()),
                "exp": int(time.time()) + 60,
            },
            None,
            algorithm="none",
            headers={"kid": "k1"},
        ),
        "junk": "not.a.token",
    }[how]
    before = state(cloud, store)
    with pytest.raises(grpc.RpcError) as err:
        call(channel, request("dev-a"), token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert state(cloud, store) == before


def _tamper(token: str, key) -> str:
    """The token with its claims rewritten to role operator, the signature kept."""
    header, _, signature = token.split(".")
    claims = jwt.decode(token, key.secret, algorithms=["HS256"])
    forged = jwt.encode({**claims, "role": "operator"}, b"x" * 32, algorithm="HS256")
    return ".".join([header, forged.split(".")[1], signature])


def test_expiry_leeway(secured, channel, keys) -> None:
    # expired 10 s ago: inside the 30 s clock-skew leeway
    token = issue_token(keys[1], "dev-a", ttl_s=60, now=time.time() - 70)
    assert call(channel, request("dev-a"), token).edit_payload


def test_health_and_reflection_stay_open(channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_rotation_without_restart(secured, channel, keys) -> None:
    directory, old = keys
    old_token = issue_token(old, "dev-r")
    new = generate_key("k2")
    with pytest.raises(grpc.RpcError) as err:  # not configured yet
        call(channel, request("dev-r"), issue_token(new, "dev-r"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    write_key(new, directory / "k2.key")  # 1. add the new key
    time.sleep(0.1)
    new_token = issue_token(new, "dev-r")  # 2. reissue
    assert call(channel, request("dev-r"), new_token).edit_payload
    assert call(channel, request("dev-r"), old_token).edit_payload  # both valid meanwhile
    (directory / "k1.key").unlink()  # 3. retire the old key
    time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as err:
        call(channel, request("dev-r"), old_token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert call(channel, request("dev-r"), new_token).edit_payload


def test_undecodable_request_is_invalid_argument(bg, catalogue) -> None:
    cloud = start(bg, catalogue, None)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as ch:
            raw = ch.unary_unary(GENERATE)  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\xff\xff\xff\xff", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed request" in err.value.details()
    finally:
        bg.run(cloud.stop(0))


@pytest.mark.parametrize("with_store", [True, False])
def test_edit_ids_increase_across_restarts(bg, catalogue, tmp_path, with_store) -> None:
    store = tmp_path / "s.sqlite" if with_store else None
    ids = []
    for _ in range(2):
        cloud = start(bg, catalogue, store)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as ch:
                ids += [call(ch, request(f"d{n}"), None).edit_id for n in range(2)]
        finally:
            bg.run(cloud.stop(0))
    assert ids == sorted(set(ids)), ids  # strictly increasing, also after the restart
