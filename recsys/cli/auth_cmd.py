"""``recsys auth``: keys and signed tokens of the gRPC services (:mod:`recsys.serving.auth`).

recsys auth keygen --out FILE [--kid ID]
recsys auth issue  --device ID --key FILE [--role device|operator] [--ttl-hours N] [--out FILE]
recsys auth verify --key PATH [--key PATH] (--token TOKEN | --token-file FILE)

Rotation without downtime: ``keygen`` a new key beside the old one (the servers, given
the directory or both files with ``--auth-key``, re-read them), ``issue`` new tokens with
it, then delete the old key file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from recsys.cli.common import add_command


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``keygen``, ``issue`` and ``verify`` to the ``auth`` group."""
    auth = groups["auth"]

    p = add_command(
        auth,
        "keygen",
        cmd_keygen,
        help="write a new HS256 signing key (JSON, mode 0600)",
        description="Write a new random 32-byte HS256 key with its key id to FILE (never "
        "overwrites). Give the file (or its directory of *.key files) to `recsys serve "
        "cloud|device --auth-key`, and to `recsys auth issue --key`.",
    )
    p.add_argument("--out", required=True, help="key file to create (e.g. keys/2026-12.key)")
    p.add_argument("--kid", help="key id written in tokens' headers (default: k-<random hex>)")

    p = add_command(
        auth,
        "issue",
        cmd_issue,
        help="issue a signed token for a device (or an operator)",
        description="Print (or write with --out, mode 0600) a JWT signed with --key whose "
        "subject is --device and whose role is device (acts for that device id / user id "
        "only) or operator (acts for any). The device sends it with every call "
        "(`recsys serve device --cloud-token-file`, or 'authorization: Bearer TOKEN').",
    )
    p.add_argument("--device", required=True, help="device id (= the user id on a device "
                   "server); for an operator token, the operator's name")  # fmt: skip
    p.add_argument("--key", required=True, help="key file to sign with")
    p.add_argument(
        "--role",
        choices=("device", "operator"),
        default="device",
        help="device: acts for its own id only; operator: for any (default device)",
    )
    p.add_argument("--ttl-hours", type=float, default=24 * 30, help="lifetime, hours (default 720)")
    p.add_argument("--out", help="write the token to this file (mode 0600) instead of stdout")

    p = add_command(
        auth,
        "verify",
        cmd_verify,
        help="check a token against keys and print its subject, role and expiry",
        description="Verify a token as a server would (signature, key id, expiry, claims); "
        "exit 0 and print its claims when it is valid, exit 2 with the reason otherwise.",
    )
    p.add_argument(
        "--key", action="append", required=True, help="key file or directory (repeatable)"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--token", help="the token")
    g.add_argument("--token-file", help="file holding the token")


def cmd_keygen(args: argparse.Namespace) -> int:
    from recsys.serving.keys import generate_key, write_key

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = generate_key(args.kid)
    write_key(key, out)
    print(f"wrote key {key.kid} to {out}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from recsys.errors import ValidationError
    from recsys.serving.auth import issue_token
    from recsys.serving.keys import read_key

    if args.ttl_hours <= 0:
        raise ValidationError(f"--ttl-hours must be > 0, got {args.ttl_hours}")
    token = issue_token(
        read_key(args.key), args.device, role=args.role, ttl_s=args.ttl_hours * 3600
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        print(f"wrote the {args.role} token for {args.device!r} to {out}", file=sys.stderr)
    else:
        print(token)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from recsys.errors import ValidationError
    from recsys.serving.auth import AuthError, TokenVerifier, read_token
    from recsys.serving.keys import KeyRing

    token = args.token or read_token(args.token_file)
    try:
        identity = TokenVerifier(KeyRing(args.key, reload_s=0)).verify(token)
    except AuthError as exc:
        raise ValidationError(f"token rejected: {exc}") from None
    expires = dt.datetime.fromtimestamp(identity.expires_at, dt.UTC).isoformat()
    print(f"subject {identity.subject!r}, role {identity.role}, key {identity.kid}, "
          f"expires {expires}")  # fmt: skip
    return 0
