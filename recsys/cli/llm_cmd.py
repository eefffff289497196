"""``recsys train lm``: the cloud codebook LM (a small Llama over semantic-ID tokens).

recsys train lm --dataset ml-100k [--split time|loo] [--codebook DIR] [--out DIR] ...

``recsys serve llm`` and ``recsys bench llm`` live in :mod:`recsys.cli.llm_serve_cmd` and
:mod:`recsys.cli.llm_bench_cmd`.
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
    add_max_minutes_option,
    add_progress_option,
    add_seed_option,
    add_threads_option,
    given,
)
from recsys.errors import ValidationError
from recsys.reporting import print_table, write_json

logger = logging.getLogger(__name__)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``lm`` to the ``train`` group."""
    p = add_command(
        groups["train"],
        "lm",
        cmd_train,
        help="train the cloud codebook LM (small Llama over semantic-ID tokens) from scratch",
        description="Write each user's training history as semantic-ID tokens (<bos><user> ID ... "
        "<sep> ID <eos>), train a small Llama causal LM from scratch on every next-item position, "
        "early-stop on the held-out next items, and save a Hugging Face directory that vLLM "
        "serves unchanged (config, safetensors, tokenizer, generation config) plus the "
        "semantic IDs and recsys_lm.json. Needs the codebook (`recsys train codebook`).",
    )
    add_dataset_option(p, required=True)
    p.add_argument(
        "--split",
        choices=("time", "loo"),
        default="time",
        help="time: the training period of the time split (the deployed model; default); "
        "loo: leave-one-out training rows (for `recsys bench llm`)",
    )
    p.add_argument(
        "--codebook", help="codebook directory (default CACHE_DIR/artifacts/NAME/codebook)"
    )
    p.add_argument(
        "--out",
        help="output directory (default CACHE_DIR/artifacts/NAME/lm, lm-loo for --split loo)",
    )
    g = p.add_argument_group("model and training (defaults: llm_cloud.lm_config.LMConfig)")
    g.add_argument("--hidden", type=int, help="residual width (default 128)")
    g.add_argument("--layers", type=int, help="transformer blocks (default 2)")
    g.add_argument("--heads", type=int, help="attention heads (default 4)")
    g.add_argument(
        "--head-dim", type=int, help="per-head width; vLLM-CPU needs 32, 64, 80, ... (default 32)"
    )
    g.add_argument("--intermediate", type=int, help="SwiGLU width (default 256)")
    g.add_argument("--max-history", type=int, help="history items per prompt (default 20)")
    g.add_argument(
        "--stride", type=int, help="items between a user's training windows (default 20)"
    )
    g.add_argument(
        "--epochs", type=int, help="maximum epochs (default 20; early stopping usually ends sooner)"
    )
    g.add_argument("--batch-size", type=int, help="windows per step (default 64)")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate (default 3e-3)")
    g.add_argument(
        "--patience", type=int, help="epochs without validation gain before stopping (default 2)"
    )
    add_max_minutes_option(g)
    g.add_argument(
        "--no-bf16",
        action="store_true",
        help="train in float32 (default: bfloat16 autocast where it is fast: GPUs, CPUs with "
        "AMX/AVX512-BF16; float32 elsewhere)",
    )
    add_seed_option(g, default=None, help="seed of initialisation and data order (default 0)")
    add_threads_option(g)
    g.add_argument(
        "--base-model",
        help="GPU path: a pretrained HF causal LM to extend with the codebook tokens and fine-tune",
    )
    g.add_argument("--device", help="cpu (default) or cuda")
    add_progress_option(g)
    add_location_options(p)
    add_json_option(p)


# option -> LMConfig field (None: keep the config's default)
LM_OPTIONS = {
    "hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads", "head_dim": "head_dim",
    "intermediate": "intermediate_size", "max_history": "max_history", "stride": "stride",
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "patience": "patience",
    "max_minutes": "max_minutes", "seed": "seed", "threads": "threads",
    "base_model": "base_model", "device": "device",
}  # fmt: skip


def lm_config(args: argparse.Namespace) -> Any:
    """The :class:`llm_cloud.lm_config.LMConfig` the options ask for (validated)."""
    from llm_cloud.lm_config import LMConfig

    overrides = given(args, LM_OPTIONS)
    if getattr(args, "no_bf16", False):
        overrides["bf16"] = False
    return LMConfig(**overrides)


def check_codebook(ds: Any, cb_dir: Path) -> dict[str, Any]:
    """The codebook's ``codebook.json``; ValidationError unless it was trained on ``ds``."""
    from codebook.io import read_json
    from codebook.semantic_ids import SemanticIdMap

    cb_meta = read_json(
        cb_dir / "codebook.json", "train a codebook first (`recsys train codebook`)"
    )
    want = cb_meta.get("info", {}).get("fingerprint")
    if want and want != ds.fingerprint():
        raise ValidationError(
            f"the codebook at {cb_dir} was trained on another version of the data "
            f"({want} != {ds.fingerprint()}); retrain it with `recsys train codebook --dataset {ds.name}`"
        )
    ids = SemanticIdMap.load(cb_dir)
    if ids.num_items != ds.num_items:
        raise ValidationError(
            f"the codebook has {ids.num_items} items, {ds.name} has {ds.num_items}"
        )
    return cb_meta


def train_and_save(
    ds: Any, split: str, codebook: str | Path, out: Path, cfg: Any, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """Train the LM on ``ds`` under ``split`` and save it to ``out``; (result, info)."""
    from codebook.semantic_ids import SemanticIdMap
    from llm_cloud.lm_train import dataset_sequences, save_lm, train_lm

    cb_dir = Path(codebook)
    cb_meta = check_codebook(ds, cb_dir)
    ids = SemanticIdMap.load(cb_dir)
    seqs, pairs, split_info = dataset_sequences(ds, split)
    result = train_lm(seqs, pairs, ids, cfg, progress=progress)
    info = {
        "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint(),
        "split": split_info,
        "codebook": {"path": str(cb_dir.resolve()), "method": cb_meta.get("method")},
    }
    save_lm(result, out, info=info)
    return result, info


def cmd_train(args: argparse.Namespace) -> int:
    from codebook.train import codebook_dir
    from llm_cloud.artifact import lm_dir
    from recsys.data.registry import load_dataset

    start = time.perf_counter()
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    cfg = lm_config(args)
    out = Path(args.out).expanduser() if args.out else lm_dir(ds.name, args.cache_dir, args.split)
    codebook = args.codebook or codebook_dir(ds.name, args.cache_dir)
    print(f"training the codebook LM on {ds.name} ({args.split} split) -> {out}")
    result, info = train_and_save(ds, args.split, codebook, out, cfg, progress=not args.no_progress)
    print_table(
        [
            {
                "epoch": int(h["epoch"]),
                "train_loss": h["train_loss"],
                "valid_nll": h["valid_nll"],
                "seconds": f"{h['seconds']:.1f}",
            }
            for h in result.history
        ],
        title=f"codebook LM: {result.num_parameters:,} parameters, {result.num_windows:,} windows/epoch, "
        f"best epoch {result.best_epoch}",
    )
    report_trained(args, result, info, out, start, num_windows=result.num_windows,
                   best_epoch=result.best_epoch)  # fmt: skip
    return 0


def report_trained(
    args: argparse.Namespace,
    result: Any,
    info: dict[str, Any],
    out: Path,
    start: float,
    **extra: Any,
) -> None:
    """Print the validation line and where the model went; write ``--json``."""
    vm, cfg = result.valid_metrics, result.config
    if "recall@10" in vm:
        print(
            f"\nvalidation ({vm.get('users')} held-out next items, beam {cfg.eval_beams}): "
            f"recall@10 {vm['recall@10']:.4f}, ndcg@10 {vm['ndcg@10']:.4f}, "
            f"NLL {vm['nll']:.3f} nats/item"
        )
    print(f"saved to {out} in {time.perf_counter() - start:.0f} s")
    write_json(
        args.json,
        {
            **info,
            "output": str(out),
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "num_parameters": result.num_parameters,
            **extra,
            "history": result.history,
            "valid_metrics": vm,
            "seconds": result.seconds,
        },
    )
