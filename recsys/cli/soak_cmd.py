"""``recsys bench soak``: a bounded soak of both gRPC services over loopback.

recsys bench soak [--dataset ml-100k] [--minutes 10] [--interval 10]
                  [--recommend-rate 100] [--event-rate 50] [--edit-rate 2] [--edit-via device]
                  [--rss-growth-mb 50] [--json PATH] [--plot PATH.png]

Exit code 0 when the soak passes (no error, both servers alive, RSS growth within the
bound), 1 when it fails. The soak itself is :mod:`recsys.workflows.soak`.
"""

from __future__ import annotations

import argparse

from recsys.cli.common import add_json_option, add_location_options
from recsys.cli.serve_cmd import _artifacts, _opt, default_checkpoint
from recsys.reporting import write_json


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``soak`` to ``bench``."""
    p = groups["bench"].add_parser(
        "soak",
        help="soak of both gRPC services over loopback: errors, p99 and RSS over time",
        description="Start the cloud server and a device server linked to it as child "
        "processes (ephemeral ports, no state file unless --state), drive a mixed open-loop "
        "workload for --minutes (Recommend; RecordEvent, half of it to a growing set of new "
        "users so the device's --max-users bound evicts; RequestEdit on the device, which "
        "calls the cloud's GenerateEdit, or GenerateEdit directly), and sample every "
        "--interval: calls, errors by status code, p50/p99 per RPC, each server's RSS and "
        "CPU, the device's users in memory and its calls to the cloud. Passes (exit 0) "
        "with no error and each server's RSS growth after the first --rss-baseline seconds "
        "within --rss-growth-mb; exit 1 otherwise.",
    )
    p.add_argument("--dataset", default="ml-100k", help="dataset (default ml-100k)")
    p.add_argument("--checkpoint", help="ranker checkpoint (default: as for serve device)")
    p.add_argument(
        "--adaptor",
        help="adaptor artefact the cloud serves (default CACHE_DIR/artifacts/NAME/adaptor/"
        "adaptor.pt)",
    )
    p.add_argument(
        "--edit-engine",
        choices=("auto", "artifacts", "tiny"),
        default="auto",
        help="cloud engine (auto: artifacts if the adaptor exists, else tiny)",
    )
    _opt(p, "--minutes", 10.0, "measured minutes")
    _opt(p, "--interval", 10.0, "sampling period, s")
    _opt(p, "--concurrency", 32, "calls in flight at most, per RPC")
    _opt(p, "--recommend-rate", 100.0, "Recommend calls per second (0 = none)")
    _opt(p, "--event-rate", 50.0, "RecordEvent calls per second (0 = none)")
    _opt(p, "--edit-rate", 2.0, "edit requests per second (0 = none)")
    p.add_argument(
        "--edit-via",
        choices=("device", "cloud"),
        default="device",
        help="device: RequestEdit on the device (waits for the cloud's edit); cloud: "
        "GenerateEdit on the cloud (default device)",
    )
    _opt(p, "--events-per-user", 10, "events each new soak user gets")
    _opt(p, "--users", 500, "benchmark users Recommend and edits cycle over")
    _opt(p, "--k", 10, "k of Recommend")
    _opt(p, "--max-users", 1000, "the device's users in memory (--max-users of serve device)")
    _opt(p, "--cloud-deadline", 1.0, "the device's GenerateEdit deadline, s")
    _opt(p, "--torch-threads", 1, "torch threads in the servers")
    p.add_argument("--state", help="device state file (default: none, memory only)")
    p.add_argument(
        "--auth",
        action="store_true",
        help="servers check a signed operator token on every call (a key made for the run)",
    )
    _opt(p, "--rss-growth-mb", 50.0, "bound on each server's RSS growth after the baseline, MB")
    _opt(p, "--rss-baseline", 60.0, "RSS baseline: the last sample at or before this, s")
    _opt(p, "--seed", 0, "seed of the RecordEvent items")
    p.add_argument("--plot", metavar="PATH.png", help="write p99 and RSS over time to this PNG")
    add_location_options(p)
    add_json_option(p)
    p.set_defaults(handler=cmd_bench_soak)


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from recsys.workflows.soak import SoakConfig, plot_soak, run_soak

    cfg = SoakConfig(
        checkpoint=str(default_checkpoint(args)),
        adaptor=args.adaptor or str(_artifacts(args) / "adaptor" / "adaptor.pt"),
        dataset=args.dataset,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        minutes=args.minutes,
        interval_s=args.interval,
        concurrency=args.concurrency,
        recommend_rate=args.recommend_rate,
        event_rate=args.event_rate,
        edit_rate=args.edit_rate,
        edit_via=args.edit_via,
        events_per_user=args.events_per_user,
        users=args.users,
        k=args.k,
        max_users=args.max_users,
        cloud_deadline=args.cloud_deadline,
        edit_engine=args.edit_engine,
        torch_threads=args.torch_threads,
        state=args.state,
        auth=args.auth,
        rss_growth_mb=args.rss_growth_mb,
        rss_baseline_s=args.rss_baseline,
        seed=args.seed,
    )
    report = run_soak(cfg)
    write_json(args.json, report)
    if args.plot:
        plot_soak(report, args.plot)
    return 0 if report["passed"] else 1
