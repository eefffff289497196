"""``recsys bench scale``: device cost versus size on synthetic data (issue 17).

recsys bench scale [--sizes 10000,100000,1000000] [--users 10000,100000] [--events 100000]
                   [--threads 1] [--json PATH]

The harness is :mod:`device_ranker.scale_bench`; this module holds the options, prints the
tables and writes the JSON and the PNG (next to ``--json``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import add_command, add_json_option, add_seed_option, add_threads_option
from recsys.reporting import print_table, write_json


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(float(s)) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    p = add_command(
        groups["bench"],
        "scale",
        cmd_bench_scale,
        help="device cost vs size on synthetic data: Recommend latency, recall, memory, events/s",
        description="Synthetic, seeded data the command generates itself (Zipf popularity, "
        "clustered item vectors, log-normal history lengths) and the real ranker (TorchRec, "
        "random weights) at the trained dimensions: per catalogue size, Recommend p50/p99 "
        "for one user and batched throughput (faiss pre-selection from AnnConfig.min_items "
        "items, exact below), its recall@10 against exact scoring, bytes per item (model + "
        "index) and the edit-apply cost; per user-table size, bytes per user in the device "
        "server's UserStore (tracemalloc; sizes not measured are extrapolated and labelled); "
        "events/s of the device-side per-event loop. Writes a PNG of cost vs size next to "
        "--json.",
    )
    p.add_argument(
        "--sizes",
        type=_ints,
        default=(10_000, 100_000, 1_000_000),
        help="catalogue sizes, comma-separated (default 10000,100000,1000000)",
    )
    p.add_argument(
        "--users",
        type=_ints,
        default=(10_000, 100_000),
        help="user-table sizes measured (default 10000,100000)",
    )
    p.add_argument(
        "--extrapolate-users",
        type=_ints,
        default=(1_000_000,),
        help="user-table sizes extrapolated from the measured ones (default 1000000)",
    )
    p.add_argument(
        "--events",
        type=int,
        default=100_000,
        help="events of the per-event loop (default 100000; 0 skips it)",
    )
    p.add_argument(
        "--loop-items",
        type=int,
        default=10_000,
        help="catalogue of the user table and the per-event loop (default 10000)",
    )
    p.add_argument(
        "--latency-users", type=int, default=200, help="single-user calls timed (default 200)"
    )
    p.add_argument(
        "--recall-users",
        type=int,
        default=500,
        help="users whose top-10 is compared with exact scoring (default 500)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="users per batched call (default 64)")
    add_threads_option(p)
    add_seed_option(p, help="seed of the synthetic data and the model (default 0)")
    add_json_option(p)


def _row_catalogue(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "items": r["items"],
        "path": r["path"],
        "Recommend p50 (ms)": r["recommend_p50_ms"],
        "Recommend p99 (ms)": r["recommend_p99_ms"],
        "CPU p50 / p99 (ms)": f"{r['recommend_cpu_p50_ms']:.2f} / {r['recommend_cpu_p99_ms']:.2f}",
        "CPU share": r["cpu_share"],
        "batched (users/s)": r["batch_users_per_s"],
        "recall@10 vs exact": r["recall_at_10"],
        "bytes/item (model + index)": r["bytes_per_item"],
        "bytes/item (+ id maps)": r["server_bytes_per_item"],
        "index build (s)": r["index_build_s"],
        "edit apply p50 (us)": r["edit_apply_p50_us"],
    }


def _row_users(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "users": r["users"],
        "measured": "measured" if r["measured"] else "extrapolated",
        "bytes/user": r["bytes_per_user"],
        "store estimate (bytes/user)": r["estimate_bytes_per_user"] or "",
        "user table (MiB)": r["total_mib"],
        "events held": r["events_held"] or "",
    }


def cmd_bench_scale(args: argparse.Namespace) -> int:
    import faiss
    import torch

    from device_ranker.scale_bench import ScaleConfig, plot_scale, run_scale_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads or torch.get_num_threads())
    cfg = ScaleConfig(
        sizes=args.sizes,
        users=args.users,
        extrapolate_users=args.extrapolate_users,
        events=args.events,
        loop_items=args.loop_items,
        loop_users=min(args.users) if args.users else 10_000,
        batch=args.batch_size,
        latency_users=args.latency_users,
        recall_users=args.recall_users,
        seed=args.seed or 0,
    )
    t0 = time.perf_counter()

    def show(kind: str, row: dict[str, Any]) -> None:
        if kind == "catalogue":
            print_table([_row_catalogue(row)], title=f"N = {row['items']:,} items")
        else:
            print_table([_row_users(row)], title=f"{row['users']:,} users")

    figures = run_scale_bench(cfg, progress=show)
    print_table(
        [_row_catalogue(r) for r in figures["catalogue"]],
        title=f"Catalogue size (synthetic, {figures['torch_threads']} torch thread(s), top-10)",
    )
    print_table(
        [_row_users(r) for r in figures["user_table"]],
        title=f"Device server user table (catalogue {cfg.loop_items:,} items)",
    )
    loop = figures["event_loop"]
    if loop:
        print_table(
            [
                {
                    "events": loop["events"],
                    "items": loop["items"],
                    "users": loop["users"],
                    "batch": loop["batch"],
                    "seconds": loop["seconds"],
                    "events/s": loop["events_per_s"],
                }
            ],
            title="Per-event loop (" + loop["loop"] + ")",
        )
    print(f"(bench {time.perf_counter() - t0:.0f} s)")
    if args.json:
        png = Path(args.json).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_scale(figures, str(png))
        print(f"wrote {png}")
        figures["plot"] = png.name
    write_json(args.json, {**figures, "seed": cfg.seed, "faiss": faiss.__version__})
    return 0
