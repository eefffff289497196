"""Signed device tokens (recsys.serving.auth, recsys.serving.keys): keys, issue/verify, expiry, forgery,
rotation, and the `recsys auth` commands. The servers' use of them is tested in
tests/llm_cloud/service/test_cloud_auth.py and tests/device_ranker/service/test_device_auth.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest

from recsys.cli import main
from recsys.errors import ValidationError
from recsys.serving.auth import AuthError, Identity, TokenVerifier, issue_token
from recsys.serving.keys import KeyRing, SigningKey, generate_key, read_key, write_key
from recsys.serving.redact import id_ref


def ring_of(tmp_path: Path, *kids: str) -> tuple[KeyRing, list[SigningKey]]:
    keys = [generate_key(k) for k in kids]
    for k in keys:
        write_key(k, tmp_path / f"{k.kid}.key")
    return KeyRing([tmp_path], reload_s=0), keys


def test_key_files_round_trip_and_are_private(tmp_path) -> None:
    key = generate_key("k1")
    path = write_key(key, tmp_path / "k1.key")
    assert read_key(path) == key and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValidationError, match="exists"):
        write_key(generate_key("k1"), path)
    (tmp_path / "bad.key").write_text("{}")
    with pytest.raises(ValidationError, match="not a key file"):
        read_key(tmp_path / "bad.key")
    with pytest.raises(ValidationError, match="at least 32"):
        SigningKey("k", b"short")


def test_issue_and_verify(tmp_path) -> None:
    ring, (key,) = ring_of(tmp_path, "k1")
    ident = TokenVerifier(ring).verify(issue_token(key, "dev-1", ttl_s=60))
    assert ident == Identity("dev-1", "device", ident.expires_at, "k1")
    assert ident.may_act_for("dev-1") and not ident.may_act_for("dev-2")
    ops = TokenVerifier(ring).verify(issue_token(key, "alice", role="operator"))
    assert ops.may_act_for("anyone")
    header = jwt.get_unverified_header(issue_token(key, "dev-1"))
    assert header == {"alg": "HS256", "kid": "k1", "typ": "JWT"}
    for bad in (dict(subject=""), dict(subject="d", role="admin"), dict(subject="d", ttl_s=0)):
        with pytest.raises(ValidationError):
            issue_token(key, **bad)


def test_expiry_with_leeway_also_when_cached(tmp_path) -> None:
    ring, (key,) = ring_of(tmp_path, "k1")
    verifier = TokenVerifier(ring, leeway_s=5)
    now = time.time()
    token = issue_token(key, "d", ttl_s=10, now=now)
    assert verifier.verify(token, now=now).subject == "d"  # cached from here on
    assert verifier.verify(token, now=now + 14).subject == "d"  # within the leeway
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(token, now=now + 16)
    with pytest.raises(AuthError, match="expired"):  # not cached: decoded and refused
        TokenVerifier(ring, leeway_s=5).verify(issue_token(key, "d", ttl_s=10, now=now - 100))


def test_forgeries_are_rejected(tmp_path) -> None:
    ring, (key,) = ring_of(tmp_path, "k1")
    verifier = TokenVerifier(ring)
    now = int(time.time())
    claims = {"sub": "d", "role": "operator", "iat": now, "exp": now + 60}
    hs = {"algorithm": "HS256", "headers": {"kid": "k1"}}
    cases = {
        "signature": issue_token(generate_key("k1"), "d"),  # right kid, wrong secret
        "unknown key": issue_token(generate_key("k9"), "d"),
        "algorithm": jwt.encode(claims, None, algorithm="none", headers={"kid": "k1"}),
        "malformed": "a.b.c",
        "role": jwt.encode({**claims, "role": "root"}, key.secret, **hs),
        "exp": jwt.encode({"sub": "d", "role": "device", "iat": now}, key.secret, **hs),
        "iat": jwt.encode({**claims, "iat": now + 3600, "exp": now + 7200}, key.secret, **hs),
    }
    for words, token in cases.items():
        with pytest.raises(AuthError) as err:
            verifier.verify(token)
        assert words in str(err.value), (words, err.value)


def test_keyring_limits_and_rotation(tmp_path) -> None:
    ring, (k1, k2) = ring_of(tmp_path, "k1", "k2")
    verifier = TokenVerifier(ring)
    assert {verifier.verify(issue_token(k, "d")).kid for k in (k1, k2)} == {"k1", "k2"}
    write_key(generate_key("k3"), tmp_path / "k3.key")
    with pytest.raises(ValidationError, match="at most 2"):
        KeyRing([tmp_path])
    (tmp_path / "k3.key").unlink()
    dup = tmp_path / "other"
    dup.mkdir()
    write_key(generate_key("k1"), dup / "a.key")
    with pytest.raises(ValidationError, match="two keys with the id"):
        KeyRing([tmp_path / "k1.key", dup / "a.key"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="no key files"):
        KeyRing([tmp_path / "empty"])
    with pytest.raises(ValidationError, match="cannot read the key file"):
        KeyRing([tmp_path / "missing.key"])


def test_reload_picks_up_changes_and_keeps_keys_on_a_bad_change(tmp_path) -> None:
    (tmp_path / "keys").mkdir()
    ring, (k1,) = ring_of(tmp_path / "keys", "k1")
    ring.reload_s = 0.01
    verifier = TokenVerifier(ring)
    old = issue_token(k1, "d")
    assert verifier.verify(old).kid == "k1"
    k2 = generate_key("k2")
    write_key(k2, tmp_path / "keys" / "k2.key")
    time.sleep(0.02)
    assert verifier.verify(issue_token(k2, "d")).kid == "k2"
    (tmp_path / "keys" / "k1.key").unlink()
    time.sleep(0.02)
    with pytest.raises(AuthError, match="unknown key"):  # no longer accepted, cache or not
        verifier.verify(old)
    (tmp_path / "keys" / "k2.key").write_text("garbage")  # a broken edit: keep k2
    time.sleep(0.02)
    assert verifier.verify(issue_token(k2, "e")).kid == "k2"


def test_id_ref_is_short_and_stable() -> None:
    assert id_ref("u42") == id_ref("u42") != id_ref("u43")
    assert len(id_ref("u42")) == 13 and "u42" not in id_ref("u42")


def test_cli_keygen_issue_verify(tmp_path, capsys) -> None:
    key = tmp_path / "keys" / "k.key"
    assert main(["auth", "keygen", "--out", str(key), "--kid", "2026-12"]) == 0
    assert json.loads(key.read_text())["kid"] == "2026-12"
    assert main(["auth", "keygen", "--out", str(key)]) == 2  # never overwritten
    capsys.readouterr()
    assert main(["auth", "issue", "--device", "phone-7", "--key", str(key),
                 "--ttl-hours", "2"]) == 0  # fmt: skip
    token = capsys.readouterr().out.strip()
    assert main(["auth", "verify", "--key", str(key.parent), "--token", token]) == 0
    out = capsys.readouterr().out
    assert "'phone-7'" in out and "role device" in out and "2026-12" in out
    tok_file = tmp_path / "ops.token"
    assert main(["auth", "issue", "--device", "ops", "--role", "operator", "--key", str(key),
                 "--out", str(tok_file)]) == 0  # fmt: skip
    assert tok_file.stat().st_mode & 0o777 == 0o600
    assert main(["auth", "verify", "--key", str(key), "--token-file", str(tok_file)]) == 0
    assert "role operator" in capsys.readouterr().out
    other = tmp_path / "other.key"
    main(["auth", "keygen", "--out", str(other), "--kid", "2026-12"])
    assert main(["auth", "verify", "--key", str(other), "--token", token]) == 2
    assert "signature" in capsys.readouterr().err
