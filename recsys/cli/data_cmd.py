"""``recsys data``: prepare, inspect and fetch datasets.

recsys data prepare ml-100k [--force]
recsys data info ml-100k|PATH [--json out.json]
recsys data fetch ml-100k [--url URL] [--no-verify]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from recsys.cli.common import add_command, add_json_option, add_location_options
from recsys.reporting import print_table, write_json

if TYPE_CHECKING:  # the CLI imports pandas only inside commands
    from recsys.data.canonical import Dataset

logger = logging.getLogger(__name__)

# Names for --help, kept here so building the parser imports no pandas; a test checks them
# against recsys.data.registry.DATASETS and recsys.data.fetch.ARCHIVES.
DATASET_NAMES = ("ml-100k", "amazon-scientific", "tiktok")
FETCHABLE = ("ml-100k",)
# timestamps in this range are taken as unix seconds when a dataset does not say
_UNIX_RANGE = (
    datetime(1990, 1, 1, tzinfo=UTC).timestamp(),
    datetime(2100, 1, 1, tzinfo=UTC).timestamp(),
)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``prepare``, ``info`` and ``fetch`` to the ``data`` group."""
    data = groups["data"]
    known = ", ".join(DATASET_NAMES)

    p = add_command(
        data,
        "prepare",
        cmd_prepare,
        help="convert a raw dataset into the canonical format (cached)",
        description="Convert the raw files of NAME into a canonical dataset directory at "
        "CACHE_DIR/datasets/NAME (reused on later runs unless --force).",
    )
    p.add_argument("name", metavar="NAME", help=f"dataset name ({known})")
    p.add_argument("--force", action="store_true", help="rebuild even if a prepared copy exists")
    add_location_options(p)

    p = add_command(
        data,
        "info",
        cmd_info,
        help="print a dataset's statistics",
        description="Print users, items, interactions, time range, activity statistics, "
        "ratings, text coverage, feature matrices and join reports of a dataset.",
    )
    p.add_argument(
        "dataset",
        metavar="PATH_OR_NAME",
        help=f"a canonical dataset directory or a dataset name ({known}; prepared if needed)",
    )
    add_json_option(p)
    add_location_options(p)

    p = add_command(
        data,
        "fetch",
        cmd_fetch,
        help="download an official dataset archive",
        description="Download and unpack NAME into the raw data directory (--data-dir if "
        "given, else CACHE_DIR/raw, where `data prepare` also looks), checking the archive's "
        "SHA-256.",
    )
    p.add_argument("name", metavar="NAME", help=f"dataset to download ({', '.join(FETCHABLE)})")
    p.add_argument("--url", help="download from this address instead (a mirror or a file:// URL)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the SHA-256 check against the official archive (only for an archive "
        "built locally; a mirror of the official file passes the check)",
    )
    add_location_options(p)


# ---- handlers -------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> int:
    from recsys.data.canonical import read_dataset
    from recsys.data.registry import prepare_dataset

    start = time.perf_counter()
    path = prepare_dataset(
        args.name, data_dir=args.data_dir, cache_dir=args.cache_dir, force=args.force
    )
    elapsed = time.perf_counter() - start
    ds = read_dataset(path, with_features=False)
    print(
        f"{args.name}: {ds.num_users:,} users, {ds.num_items:,} items, "
        f"{len(ds.interactions):,} interactions -> {path} ({elapsed:.1f} s)"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from recsys.data.registry import load_dataset

    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    summary = summarize_dataset(ds)
    print_summary(summary)
    write_json(args.json, {"dataset": str(args.dataset), **summary})
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    import pooch

    from recsys import settings
    from recsys.cli import quiet
    from recsys.data.fetch import REGISTERED, fetch_dataset

    quiet.adopt(pooch.get_logger())  # its "Downloading data from ..." line is INFO

    dest = (
        settings.raw_data_dir(args.data_dir)
        if args.data_dir
        else settings.cache_dir(args.cache_dir) / "raw"
    )
    known_hash = None if args.no_verify else REGISTERED
    folder = fetch_dataset(args.name, dest, url=args.url, known_hash=known_hash)
    hint = "" if args.data_dir else " (searched by `data prepare` after the data directory)"
    print(f"fetched {args.name} into {folder}{hint}")
    return 0


# ---- statistics -----------------------------------------------------------------------------
def _stats(counts: Any) -> dict[str, float]:
    return {
        "min": int(counts.min()),
        "median": float(counts.median()),
        "mean": round(float(counts.mean()), 2),
        "max": int(counts.max()),
    }


def _is_unix(ds: Dataset) -> bool:
    unit = ds.info.get("timestamp_unit")
    if unit is not None:
        return unit == "unix_seconds"
    return bool(_UNIX_RANGE[0] <= ds.timestamps.min() and ds.timestamps.max() < _UNIX_RANGE[1])


def summarize_dataset(ds: Dataset) -> dict[str, Any]:
    """Every figure ``data info`` prints, as a JSON-ready dict."""
    inter = ds.interactions
    n = len(inter)
    out: dict[str, Any] = {
        "name": ds.name,
        "users": ds.num_users,
        "items": ds.num_items,
        "interactions": n,
        "items_with_interactions": int(inter["item_id"].nunique()),
        "density": round(n / (ds.num_users * ds.num_items), 6)
        if ds.num_users and ds.num_items
        else 0.0,
    }
    ts_min, ts_max = int(ds.timestamps.min()), int(ds.timestamps.max())
    time_range: dict[str, Any] = {
        "unit": ds.info.get("timestamp_unit", "unknown"),
        "min": ts_min,
        "max": ts_max,
    }
    if _is_unix(ds):
        first = datetime.fromtimestamp(ts_min, tz=UTC)
        last = datetime.fromtimestamp(ts_max, tz=UTC)
        time_range.update(
            unit="unix_seconds",
            first=first.strftime("%Y-%m-%d %H:%M:%S UTC"),
            last=last.strftime("%Y-%m-%d %H:%M:%S UTC"),
            days=round((ts_max - ts_min) / 86400, 1),
        )
    out["time_range"] = time_range
    out["interactions_per_user"] = _stats(inter.groupby("user_id").size())
    out["interactions_per_item"] = _stats(inter.groupby("item_id").size())
    if "rating" in inter.columns:
        dist = inter["rating"].value_counts().sort_index()
        out["ratings"] = {
            "distribution": {_fmt_rating(k): int(v) for k, v in dist.items()},
            "mean": round(float(inter["rating"].mean()), 4),
        }
    coverage = {}
    for col in ds.items.columns:
        if col == "item_id":
            continue
        values = ds.items[col]
        present = values.notna() & (values.astype(str).str.strip() != "")
        coverage[col] = round(float(present.mean()), 4)
    out["text_coverage"] = coverage
    out["features"] = {
        m: {"shape": list(x.shape), "dtype": str(x.dtype)} for m, x in ds.features.items()
    }
    join = ds.info.get("ml1m_join")
    if isinstance(join, dict):
        out["ml1m_join"] = {k: v for k, v in join.items() if k != "unmatched"}
    for key in ("phase_start", "phase_events", "timestamp_note"):
        if key in ds.info:
            out[key] = ds.info[key]
    return out


def _fmt_rating(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def print_summary(s: dict[str, Any]) -> None:
    """Human-readable ``data info`` output."""
    print(f"dataset {s['name']}")
    print(f"  users          {s['users']:,}")
    print(f"  items          {s['items']:,} ({s['items_with_interactions']:,} with interactions)")
    print(f"  interactions   {s['interactions']:,} (density {s['density']:.4%})")
    tr = s["time_range"]
    if "first" in tr:
        print(f"  time range     {tr['first']} .. {tr['last']} ({tr['days']} days)")
    else:
        print(f"  time range     {tr['min']} .. {tr['max']} ({tr['unit']}; not dates)")
    if "timestamp_note" in s:
        print(f"  timestamps     {s['timestamp_note']}")
    rows = [
        {
            "per": what,
            "min": st["min"],
            "median": f"{st['median']:g}",
            "mean": f"{st['mean']:.2f}",
            "max": st["max"],
        }
        for what, st in (("user", s["interactions_per_user"]), ("item", s["interactions_per_item"]))
    ]
    print_table(rows, title="interactions per user / item")
    if "ratings" in s:
        total = sum(s["ratings"]["distribution"].values())
        print_table(
            [
                {"rating": k, "count": v, "share": v / total}
                for k, v in s["ratings"]["distribution"].items()
            ],
            title=f"ratings (mean {s['ratings']['mean']:.3f})",
        )
    if s["text_coverage"]:
        print_table(
            [{"field": k, "coverage": v} for k, v in s["text_coverage"].items()],
            title="item fields (share of items with a value)",
        )
    if s["features"]:
        print_table(
            [
                {"modality": m, "shape": " x ".join(map(str, f["shape"])), "dtype": f["dtype"]}
                for m, f in s["features"].items()
            ],
            title="feature matrices",
        )
    if "phase_events" in s:
        print_table(
            [
                {"phase": p, "first_timestamp": s["phase_start"][p], "events": e}
                for p, e in s["phase_events"].items()
            ],
            title="phases",
        )
    join = s.get("ml1m_join")
    if join and "rate" in join:
        covered = join.get("interactions_covered", math.nan)
        print(
            f"\nml-1m join: {join['matched']:,}/{join['total']:,} items matched "
            f"(rate {join['rate']:.2%}; {covered:.2%} of interactions), by rule {join['by_rule']}"
        )
    elif join:
        print(f"\nml-1m join: {join.get('status', join)}")
