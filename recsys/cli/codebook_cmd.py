"""``recsys train codebook``: semantic codebook + collision-free semantic IDs of a dataset.

Example::

    recsys train codebook --dataset ml-100k                          # RQ-VAE, L=3, K auto
    recsys train codebook --dataset tiktok --method rqkmeans --codes 128 --json out/cb.json
    recsys train codebook --dataset ml-100k --collaborative item_emb.npy   # + ranker vectors
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import (
    add_command,
    add_dataset_option,
    add_json_option,
    add_location_options,
    add_modalities_option,
    add_progress_option,
    add_seed_option,
    modalities_of,
)
from recsys.errors import ValidationError
from recsys.reporting import print_table, write_json

logger = logging.getLogger(__name__)


def _load_collaborative(path: str | None) -> Any:
    """``--collaborative PATH`` -> float matrix [I, D_c] (shape checked by the fusion)."""
    if not path:
        return None
    import numpy as np

    try:
        matrix = np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValidationError(
            f"--collaborative {path}: cannot read a .npy matrix ({exc})"
        ) from None
    if matrix.ndim != 2:
        raise ValidationError(
            f"--collaborative {path}: expected a matrix [I, D], got shape {matrix.shape}"
        )
    return matrix


def _train(args: argparse.Namespace) -> int:
    from codebook.train import CodebookConfig, codebook_dir, train_codebook
    from recsys.data.registry import load_dataset
    from recsys.features import build_item_features

    start = time.perf_counter()
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    collaborative = _load_collaborative(args.collaborative)
    modalities = modalities_of(args)
    features = build_item_features(
        ds,
        cache_dir=args.cache_dir,
        modalities=modalities,
        collaborative=collaborative,
        progress=not args.no_progress,
    )
    config = CodebookConfig(
        method=args.method, levels=args.levels, codes=args.codes, seed=args.seed
    )
    if args.epochs is not None:
        config.rqvae.epochs = args.epochs
    codebook = train_codebook(
        features.matrix,
        config,
        item_ids=ds.item_ids,
        info={
            "dataset": ds.name,
            "dataset_arg": str(args.dataset),
            "fingerprint": ds.fingerprint(),
            "feature_layout": {m: list(s) for m, s in features.layout.items()},
            "feature_weights": features.weights,
            "collaborative": str(args.collaborative) if args.collaborative else None,
        },
        progress=not args.no_progress,
    )
    out = Path(args.out).expanduser() if args.out else codebook_dir(ds.name, args.cache_dir)
    codebook.save(out)
    report = codebook.report
    assert report is not None and not isinstance(report, dict)
    layout = ", ".join(f"{m} {e - s}" for m, (s, e) in features.layout.items())
    print_table(
        report.rows(),
        title=f"{report.method} codebook of {ds.name}: {report.items:,} items x {report.dim} dims "
        f"({layout}), L={config.levels}, K={config.codes}, seed {config.seed} -> {out}",
    )
    summary = report.summary()
    print_table(
        [
            {
                "unique_prefixes": summary["unique_prefixes"],
                "collision_rate": summary["collision_rate"],
                "colliding_items": summary["colliding_items"],
                "max_per_prefix": summary["max_per_prefix"],
                "final_unique": "yes" if summary["final_unique"] else "NO",
                "rel_mse": summary["rel_mse"],
                "unexplained_var": summary["unexplained_var"],
                "vocab_size": summary["vocab_size"],
                "train_s": summary["seconds"],
            }
        ]
    )
    print(f"example: item {ds.item_ids[0]} -> {codebook.ids.to_tokens(0)}")
    write_json(
        args.json,
        {
            "dataset": ds.name,
            "fingerprint": ds.fingerprint(),
            "output": str(out),
            "config": config.to_dict(),
            "feature_layout": features.layout,
            "report": report.to_dict(),
            "vocab_sizes": codebook.ids.vocab_sizes,
            "example": {"item_id": str(ds.item_ids[0]), "tokens": codebook.ids.to_tokens(0)},
            "seconds_total": time.perf_counter() - start,
        },
    )
    if not report.final_unique:  # cannot happen by construction; guard the promise anyway
        raise ValidationError("semantic IDs are not unique; this is a bug, please report it")
    return 0


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``codebook`` to the ``train`` group."""
    p = add_command(
        groups["train"],
        "codebook",
        _train,
        help="learn the semantic codebook and the items' collision-free semantic IDs",
        description="Build the fused item features (text via MiniLM, the dataset's image/audio "
        "matrices, optional collaborative vectors), quantise them into L levels of K codes "
        "(RQ-VAE or RQ-k-means), append a disambiguation level so every item's ID is unique, "
        "print the quality report and save config, weights and semantic IDs to a directory.",
    )
    add_dataset_option(p, required=True)
    p.add_argument(
        "--method",
        choices=("rqvae", "rqkmeans"),
        default="rqvae",
        help="rqvae: MLP auto-encoder + residual VQ (default, ~10-30 s on ml-100k); rqkmeans: faiss k-means per level (seconds)",
    )
    p.add_argument(
        "--levels",
        type=int,
        default=3,
        metavar="L",
        help="quantised levels; IDs get L+1 tokens (default 3)",
    )
    p.add_argument(
        "--codes",
        type=int,
        metavar="K",
        help="codes per level (default: power of two nearest 2*sqrt(items), in [4, 256]: 64 for ml-100k, 128 for tiktok)",
    )
    add_seed_option(p, help="random seed; the same seed gives the same codebook (default 0)")
    p.add_argument("--epochs", type=int, metavar="N", help="RQ-VAE training epochs (default 200)")
    add_modalities_option(p)
    p.add_argument(
        "--collaborative",
        metavar="PATH",
        help=".npy matrix [I, D] of collaborative item vectors (e.g. the ranker's item embeddings), row i = item i, added as a modality",
    )
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default: CACHE_DIR/artifacts/NAME/codebook)"
    )
    add_progress_option(p)
    add_location_options(p)
    add_json_option(p)
