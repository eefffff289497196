"""Options shared by CLI commands (output helpers: :mod:`recsys.reporting`)."""

from __future__ import annotations

import argparse

from recsys.reporting import print_table, versions, write_json


def add_location_options(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` (raw datasets) and ``--cache-dir`` (prepared data, artefacts)."""
    parser.add_argument(
        "--data-dir",
        help="folder with the raw datasets (default: $RECSYS_DATA_DIR, else ../shared/data "
        "beside the project, else the user cache dir)",
    )
    parser.add_argument(
        "--cache-dir",
        help="folder for prepared datasets and artefacts (default: $RECSYS_CACHE_DIR, else "
        "the user cache dir, e.g. ~/.cache/recsys-llm-edit)",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write every printed figure to PATH")


# output helpers live in the core (recsys.reporting) so evaluations below the CLI use them
__all__ = ["add_json_option", "add_location_options", "print_table", "versions", "write_json"]
