"""Options shared by CLI commands: one definition of each, so names, defaults and help
read the same everywhere (output helpers: :mod:`recsys.reporting`).

Example::

    p = groups["train"].add_parser("thing")
    add_dataset_option(p, required=True)
    add_seed_option(p)
    add_threads_option(p)
    add_location_options(p)
    add_json_option(p)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

DEFAULT_DATASET = "ml-100k"
ArgumentTarget = argparse.ArgumentParser | argparse._ArgumentGroup  # parser or argument group


def add_command(
    group: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """``recsys GROUP NAME``: a sub-command that runs ``handler(args)``; its options are
    added to the returned parser."""
    parser = group.add_parser(name, help=help, description=description, **kwargs)
    parser.set_defaults(handler=handler)
    return parser


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
    """``--json PATH``: every printed figure, the versions and the command line."""
    parser.add_argument("--json", metavar="PATH", help="also write every printed figure to PATH")


def add_dataset_option(
    parser: ArgumentTarget, *, required: bool = False, help: str | None = None
) -> None:
    """``--dataset NAME_OR_PATH``: a registered name or a canonical dataset directory;
    ``ml-100k`` unless ``required``."""
    if help is None:
        help = "dataset name (ml-100k, tiktok, ...) or canonical dataset directory"
        if not required:
            help += f" (default {DEFAULT_DATASET})"
    parser.add_argument(
        "--dataset",
        metavar="NAME_OR_PATH",
        required=required,
        default=None if required else DEFAULT_DATASET,
        help=help,
    )


def add_seed_option(parser: ArgumentTarget, *, default: int | None = 0, help: str) -> None:
    """``--seed S`` (what it seeds goes in ``help``)."""
    parser.add_argument("--seed", type=int, default=default, metavar="S", help=help)


def add_threads_option(
    parser: ArgumentTarget, *, default: int | None = None, help: str | None = None
) -> None:
    """``--threads N``: torch intra-op threads (None: torch's choice)."""
    if help is None:
        help = (
            f"torch intra-op threads (default {default})"
            if default is not None
            else "torch intra-op threads (default: torch's choice; 1 is often faster on a "
            "busy machine)"
        )
    parser.add_argument("--threads", type=int, default=default, metavar="N", help=help)


def add_max_minutes_option(parser: ArgumentTarget, *, help: str | None = None) -> None:
    """``--max-minutes M``: a training run's wall-time budget."""
    parser.add_argument(
        "--max-minutes",
        type=float,
        metavar="M",
        help=help or "wall-time budget; stops after the epoch that crosses it",
    )


def add_progress_option(parser: ArgumentTarget) -> None:
    """``--no-progress``: hide progress bars (logs and CI)."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_modalities_option(parser: argparse.ArgumentParser) -> None:
    """``--modalities LIST`` (read back with :func:`modalities_of`)."""
    parser.add_argument(
        "--modalities",
        metavar="LIST",
        help="comma-separated modalities to fuse, in block order (default: all the dataset has)",
    )


def modalities_of(args: argparse.Namespace) -> list[str] | None:
    """``--modalities a,b`` -> ["a", "b"]; None when not given (every modality)."""
    if not args.modalities:
        return None
    return [m.strip() for m in args.modalities.split(",") if m.strip()]


def given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """``{field: value}`` of the options in ``names`` (option dest -> config field) that
    were given (not None): the overrides of a config's defaults."""
    return {
        field: getattr(args, dest)
        for dest, field in names.items()
        if getattr(args, dest, None) is not None
    }


__all__ = [
    "DEFAULT_DATASET",
    "add_command",
    "add_dataset_option",
    "add_json_option",
    "add_location_options",
    "add_max_minutes_option",
    "add_modalities_option",
    "add_progress_option",
    "add_seed_option",
    "add_threads_option",
    "given",
    "modalities_of",
]
