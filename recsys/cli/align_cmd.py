"""``recsys train llm``: align a pretrained LLM (SmolLM2-135M) with the codebook.

recsys train llm --dataset ml-100k [--base smollm2] [--split time|loo] [--max-minutes 20]
                 [--resume] [--device cuda] ...

The from-scratch codebook LM is ``recsys train lm`` (:mod:`recsys.cli.llm_cmd`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import (
    add_command,
    add_dataset_option,
    add_json_option,
    add_location_options,
    add_max_minutes_option,
    add_progress_option,
    add_seed_option,
    add_threads_option,
    given,
)
from recsys.reporting import print_table

# option -> AlignConfig field
ALIGN_OPTIONS = {
    "max_history": "max_history", "text_items": "text_items", "text_tokens": "text_tokens",
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "max_minutes": "max_minutes",
    "checkpoint_minutes": "checkpoint_minutes", "eval_users": "eval_users", "seed": "seed",
    "threads": "threads", "device": "device", "code_noise": "code_noise",
    "train_code_rows": "train_code_rows",
}  # fmt: skip


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``llm`` to the ``train`` group."""
    p = add_command(
        groups["train"],
        "llm",
        cmd_train_llm,
        help="align a pretrained LLM (SmolLM2-135M) with the codebook: item text + semantic IDs",
        description="Extend a pretrained LLM's tokenizer with the codebook tokens (their embeddings "
        "start at the mean text embedding of their items, plus noise), then fine-tune the top "
        "blocks, an untied output head and the codebook rows on "
        "next-item prediction from histories written as item text and semantic IDs, plus item "
        "text <-> ID alignment, under a wall-time budget with resumable checkpoints. Saves a "
        "Hugging Face directory that the transformers and vLLM backends serve (same trie "
        "constraint as the small LM). Needs `recsys train codebook` and `recsys llm import "
        "smollm2` (done automatically when missing).",
    )
    add_dataset_option(p, required=True)
    p.add_argument(
        "--base",
        default="smollm2",
        help="pretrained model: a name of `recsys llm list` (imported on first use) or a Hugging "
        "Face causal-LM directory (default smollm2)",
    )
    p.add_argument(
        "--split",
        choices=("time", "loo"),
        default="time",
        help="time: the time split's training period (the deployed model; default); loo: "
        "leave-one-out training rows (for `recsys bench llm`)",
    )
    p.add_argument(
        "--codebook", help="codebook directory (default CACHE_DIR/artifacts/NAME/codebook)"
    )
    p.add_argument(
        "--out",
        help="output directory (default CACHE_DIR/artifacts/NAME/llm-BASE, llm-BASE-loo for loo)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint (written every --checkpoint-minutes and when the "
        "budget ends) with the same settings",
    )
    g = p.add_argument_group("prompts and training (defaults: llm_cloud.align.AlignConfig)")
    g.add_argument("--max-history", type=int, help="history items per prompt (default 20)")
    g.add_argument(
        "--text-items", type=int, help="most recent items written with their text (default 3)"
    )
    g.add_argument("--text-tokens", type=int, help="longest item text in tokens (default 16)")
    g.add_argument("--epochs", type=int, help="passes over the data (default 1)")
    g.add_argument("--batch-size", type=int, help="sequences per step (default 8)")
    g.add_argument("--lr", type=float, help="AdamW learning rate after warm-up (default 5e-4)")
    g.add_argument(
        "--code-noise",
        type=float,
        help="noise added to the codebook tokens' text-derived embeddings, in units of the "
        "pretrained embeddings' std, so every code is a distinct token (default 1; 0 = off)",
    )
    g.add_argument(
        "--train-code-rows",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the codebook tokens' input embeddings through the frozen blocks "
        "(default on; --no-train-code-rows keeps them at their start, ~2x faster steps)",
    )
    add_max_minutes_option(g, help="wall-time budget of this run, checked after every step")
    g.add_argument(
        "--checkpoint-minutes", type=float, help="minutes between checkpoints (default 5)"
    )
    g.add_argument(
        "--eval-users", type=int, help="validation users in the final evaluation (default 300)"
    )
    add_seed_option(g, default=None, help="seed of the data order (default 0)")
    add_threads_option(g)
    g.add_argument("--device", help="cpu (default) or cuda (GPU machines)")
    add_progress_option(g)
    add_location_options(p)
    add_json_option(p)


def align_and_save(
    ds: Any,
    split: str,
    base: str,
    codebook: str | Path,
    out: Path,
    cfg: Any,
    *,
    cache_dir: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Align ``base`` on ``ds`` under ``split`` and save it to ``out``; (result, info)."""
    import torch

    from codebook.semantic_ids import SemanticIdMap
    from llm_cloud.align import align_lm, catalogue_texts
    from llm_cloud.lm_data import dataset_sequences
    from llm_cloud.lm_train import save_lm
    from llm_cloud.pretrained import import_pretrained, pretrained_dir
    from recsys import settings
    from recsys.cli.llm_cmd import check_codebook
    from recsys.errors import NotFoundError

    cache_dir = settings.cache_dir(cache_dir)
    try:
        base_dir = pretrained_dir(base, cache_dir)
    except NotFoundError:
        print(f"importing {base} first (once)")
        base_dir = import_pretrained(base, cache_dir)
    cb_dir = Path(codebook)
    cb_meta = check_codebook(ds, cb_dir)
    ids = SemanticIdMap.load(cb_dir)
    texts = catalogue_texts(ds.items)
    seqs, pairs, split_info = dataset_sequences(ds, split)
    result = align_lm(
        base_dir, seqs, pairs, ids, texts, cfg, out_dir=out, resume=resume, progress=progress
    )
    result.model.to(torch.bfloat16)  # saved as bf16 (half the size); backends choose their dtype
    info = {
        "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint(),
        "split": split_info,
        "codebook": {"path": str(cb_dir.resolve()), "method": cb_meta.get("method")},
        "base_model": {"name": base, "path": str(base_dir)},
        "kind": "aligned-pretrained",
    }
    save_lm(result, out, info=info)
    return result, info


def cmd_train_llm(args: argparse.Namespace) -> int:
    from codebook.train import codebook_dir
    from llm_cloud.align import AlignConfig
    from llm_cloud.artifact import lm_dir
    from recsys.cli.llm_cmd import report_trained
    from recsys.data.registry import load_dataset

    start = time.perf_counter()
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    cfg = AlignConfig(**given(args, ALIGN_OPTIONS))
    name = f"llm-{Path(args.base).name}"
    default = lm_dir(ds.name, args.cache_dir, args.split).with_name(
        name if args.split == "time" else f"{name}-{args.split}"
    )
    out = Path(args.out).expanduser() if args.out else default
    codebook = args.codebook or codebook_dir(ds.name, args.cache_dir)
    print(f"aligning {args.base} with the {ds.name} codebook ({args.split} split) -> {out}")
    result, info = align_and_save(
        ds, args.split, args.base, codebook, out, cfg,
        cache_dir=args.cache_dir, resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    vm = result.valid_metrics
    print_table(
        [
            {
                "epoch": h["epoch"],
                "batches": f"{h['batches']}/{h['of']}",
                "train_loss": h["train_loss"],
                "seconds": f"{h['seconds']:.0f}",
            }
            for h in result.history
        ],
        title=f"{args.base} aligned: {result.num_parameters:,} trained parameters, {vm['steps']} steps, "
        f"{vm['tokens']:,} tokens ({vm['tokens_per_second']:.0f}/s), stopped by {vm['stopped_by']}",
    )
    report_trained(args, result, info, out, start)
    return 0
