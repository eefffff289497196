"""The typed client (recsys.client) against running servers: one user's events, a
recommendation, the device's status, an edit requested from the cloud, and (with
``--cloud``) the cloud's prototypes.

    .venv/bin/recsys serve device --dataset ml-100k --port 50052 &
    .venv/bin/python examples/client_example.py --device 127.0.0.1:50052 --user 1 \
        --items 50,181,258

With tokens and TLS: ``--token-file me.token --tls-ca server.pem``.
"""

from __future__ import annotations

import argparse
import time

from recsys.client import ClientError, ClientOptions, CloudClient, DeviceClient


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", required=True, help="device host:port")
    p.add_argument("--cloud", help="cloud host:port (optional)")
    p.add_argument("--user", required=True, help="a user id of the device's dataset")
    p.add_argument("--items", default="", help="comma-separated item ids to record first")
    p.add_argument("--token-file", help="signed token (recsys auth issue)")
    p.add_argument("--tls-ca", help="PEM of the CA / the server certificate (TLS on)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per attempt, s")
    args = p.parse_args()
    opts = ClientOptions(timeout_s=args.timeout, token_file=args.token_file, tls_ca=args.tls_ca)
    try:
        with DeviceClient(args.device, opts) as dev:
            for n, item in enumerate(filter(None, args.items.split(","))):
                ev = dev.record_event(args.user, item, int(time.time()) + n, wait_for_edit=True)
                print(f"event {item}: history {ev.history_length}, gate {ev.outcome.value}")
            rec = dev.recommend(args.user, k=5)
            print(
                f"top-5 ({rec.mode.value}):",
                ", ".join(f"{i.item_id} {i.score:.3f}" for i in rec.items),
            )
            edit = dev.request_edit(args.user)
            print(f"edit request: {edit.outcome.value}, active edit {edit.edit}")
            user = dev.status(args.user).user
            print(f"user {user.user_id}: {user.history_length} events, mode {user.mode.value}")
        if args.cloud:
            with CloudClient(args.cloud, opts) as cloud:
                for proto in cloud.list_prototypes():
                    print(f"prototype {proto.id} {proto.name!r} v{proto.current_version}")
    except ClientError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
