"""``recsys db``: the prototype store's database.

recsys db upgrade [--url URL] [--revision REV]
recsys db current [--url URL]
recsys db bench   [--url URL] [--writers N] [--per-writer K] [--mode threads|processes]
                  [--strategy lock|optimistic] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging

from recsys.cli.common import add_command, add_json_option
from recsys.reporting import print_table, write_json

logger = logging.getLogger(__name__)


def _add_url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="SQLAlchemy database URL: sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB "
        "(default: $RECSYS_DATABASE_URL, else CACHE_DIR/store.sqlite)",
    )


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``upgrade``, ``current`` and ``bench`` to the ``db`` group."""
    db = groups["db"]

    p = add_command(
        db,
        "upgrade",
        cmd_upgrade,
        help="create or migrate the store's schema to the newest revision",
        description="Apply the Alembic migrations shipped with the package to the database "
        "(creating the schema on an empty one). Safe to run again: an up-to-date database "
        "is left alone.",
    )
    _add_url_option(p)
    p.add_argument("--revision", default="head", help="target revision (default: head, the newest)")

    p = add_command(
        db,
        "current",
        cmd_current,
        help="print the database's schema revision and whether it is up to date",
        description="Print the revision the database is at, the newest revision this code "
        "ships, and exit 0 when they match, 1 when the database needs `recsys db upgrade`.",
    )
    _add_url_option(p)

    p = add_command(
        db,
        "bench",
        cmd_bench,
        help="measure concurrent prototype refinement (and check no update is lost)",
        description="Create a fresh prototype and let N writers (threads or processes) "
        "refine it K times each with an increment update; print refinements/s, retries and "
        "whether the final counter equals N*K. Migrates the database first.",
    )
    _add_url_option(p)
    p.add_argument("--writers", type=int, default=8, help="concurrent writers (default 8)")
    p.add_argument("--per-writer", type=int, default=10, help="refinements per writer (default 10)")
    p.add_argument(
        "--mode",
        choices=("threads", "processes"),
        action="append",
        help="writers as threads of one process or as separate processes; repeat to run "
        "both (default: threads)",
    )
    p.add_argument(
        "--strategy",
        choices=("lock", "optimistic"),
        action="append",
        help="lock = row lock / BEGIN IMMEDIATE (the store's default); optimistic = unique "
        "version + retry; repeat to compare (default: lock)",
    )
    add_json_option(p)


def cmd_upgrade(args: argparse.Namespace) -> int:
    from codebook.store import migrate
    from codebook.store.db import parse_url

    url = parse_url(args.url)
    before = migrate.current_revision(url)
    after = migrate.upgrade(url, args.revision)
    where = url.render_as_string(hide_password=True)
    if before == after:
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: upgraded from {before or '(empty)'} to {after}")
    return 0


def cmd_current(args: argparse.Namespace) -> int:
    from codebook.store import migrate
    from codebook.store.db import parse_url

    url = parse_url(args.url)
    current = migrate.current_revision(url)
    head = migrate.head_revision()
    state = "up to date" if current == head else "needs `recsys db upgrade`"
    print(f"{url.render_as_string(hide_password=True)}")
    print(f"current revision: {current or '(empty database)'}")
    print(f"head revision:    {head}  ({state})")
    return 0 if current == head else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from codebook.store.bench import run_refine_benchmark
    from codebook.store.db import parse_url

    url = parse_url(args.url)
    rows = []
    for mode in args.mode or ["threads"]:
        for strategy in args.strategy or ["lock"]:
            result = run_refine_benchmark(
                url,
                writers=args.writers,
                per_writer=args.per_writer,
                mode=mode,
                strategy=strategy,
            )
            rows.append(result.as_dict())
    print_table(
        [
            {
                "backend": r["backend"],
                "mode": r["mode"],
                "strategy": r["strategy"],
                "writers": r["writers"],
                "refinements": r["expected"],
                "seconds": r["seconds"],
                "refinements/s": r["refinements_per_s"],
                "retries": r["retries"],
                "lost updates": r["lost_updates"],
            }
            for r in rows
        ],
        title="Concurrent refinement of one prototype",
    )
    write_json(args.json, {"refine_benchmark": rows})
    return 0 if all(r["lost_updates"] == 0 for r in rows) else 1
