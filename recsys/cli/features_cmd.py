"""``recsys features build|show``: fused item feature matrices.

Example::

    recsys features build ml-100k                       # text only (MiniLM, cached)
    recsys features build tiktok --weight image=2       # image + audio, image counts double
    recsys features show ml-100k --json out/features.json
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from recsys.cli.common import (
    add_command,
    add_json_option,
    add_location_options,
    add_modalities_option,
    add_progress_option,
    modalities_of,
)
from recsys.errors import ValidationError
from recsys.reporting import print_table, write_json

logger = logging.getLogger(__name__)


def _parse_weights(pairs: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValidationError(
                f"--weight expects MODALITY=NUMBER (e.g. image=0.5), got {pair!r}"
            ) from None
    return out


def _printable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: ("-" if v is None else v) for k, v in row.items()} for row in rows]


def _build(args: argparse.Namespace) -> int:
    from recsys.data.registry import load_dataset
    from recsys.features.fuse import build_item_features, features_dir, summarise
    from recsys.features.text import MiniLMEncoder

    modalities = modalities_of(args)
    weights = _parse_weights(args.weight)
    start = time.perf_counter()
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    features = build_item_features(
        ds,
        cache_dir=args.cache_dir,
        modalities=modalities,
        weights=weights,
        encoder=MiniLMEncoder(batch_size=args.batch_size),
        progress=not args.no_progress,
    )
    out = features.save(args.out or features_dir(args.dataset, args.cache_dir))
    seconds = time.perf_counter() - start
    rows = summarise(features)
    print_table(
        _printable(rows),
        title=f"item features of {ds.name}: [{features.num_items}, {features.dim}] -> {out}",
    )
    text = features.stats.get("text")
    if text:
        speed = f", {text['sentences_per_s']:.0f} sentences/s" if text["unique_encoded"] else ""
        print(
            f"text: {text['from_cache']} from cache, {text['encoded']} encoded, "
            f"{text['empty']} without text ({text['seconds']:.2f} s{speed})"
        )
    write_json(
        args.json,
        {
            "dataset": ds.name,
            "output": str(out),
            "num_items": features.num_items,
            "dim": features.dim,
            "layout": features.layout,
            "summary": rows,
            "stats": features.stats,
            "seconds": seconds,
        },
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from recsys.features.fuse import ItemFeatures, features_dir, summarise

    path = Path(args.target).expanduser()
    directory = (
        path
        if (path / "item_features.json").is_file()
        else features_dir(args.target, args.cache_dir)
    )
    features = ItemFeatures.load(directory)
    rows = summarise(features)
    print_table(
        _printable(rows),
        title=f"item features [{features.num_items}, {features.dim}] in {directory}",
    )
    write_json(args.json, {"path": str(directory), "layout": features.layout, "summary": rows})
    return 0


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``build`` and ``show`` to the ``features`` group."""
    sub = groups["features"]
    build = add_command(
        sub,
        "build",
        _build,
        help="compute and save the fused item feature matrix of a dataset",
        description="Embed item text (all-MiniLM-L6-v2, offline, cached per text), add the "
        "dataset's own modality matrices (e.g. TikTok image/audio), L2-normalise and weight "
        "each modality, concatenate, and save item_features.npz + item_features.json.",
    )
    build.add_argument(
        "dataset",
        metavar="NAME_OR_PATH",
        help="a dataset name (ml-100k, ...) or a canonical dataset directory",
    )
    add_modalities_option(build)
    build.add_argument(
        "--weight",
        action="append",
        metavar="MODALITY=W",
        help="block weight of a modality (default 1 each, i.e. equal shares); repeatable",
    )
    build.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="sentences per forward pass of the text model (default 64)",
    )
    build.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: beside a dataset given by path, else CACHE_DIR/features/NAME)",
    )
    add_progress_option(build)
    add_location_options(build)
    add_json_option(build)

    show = add_command(
        sub,
        "show",
        _show,
        help="print the summary of saved item features",
        description="Print modality, dimension, coverage, mean raw norm and share of saved item features.",
    )
    show.add_argument(
        "target",
        metavar="NAME_OR_DIR",
        help="a dataset name, a dataset directory or a folder holding item_features.json",
    )
    add_location_options(show)
    add_json_option(show)
