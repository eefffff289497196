"""``recsys demo``: the README's main job, run end to end on one dataset.

Stages so far (each reuses cached artefacts from earlier runs):

1. prepare the dataset (raw files -> canonical directory in the cache) and print its
   statistics, including the ml-1m text join's match rate;
2. the time split into a training period and a replay period;
3. the fused item-feature matrix (MiniLM text embeddings, cached; visual/audio where the
   dataset has them) and its summary;
4. the TorchRec device ranker (trained once, then reused from its checkpoint), its
   leave-one-out quality next to popularity, and one user's top-5.

Later stages (ranker, codebook, LM, adaptor, gRPC services, replay) are appended here as
they land, so that one command keeps running the whole pipeline.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from recsys.cli.common import add_json_option, add_location_options, print_table, write_json


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    parser = groups[""].add_parser(
        "demo",
        help="run the end-to-end demo (default dataset ml-100k)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset", default="ml-100k", help="dataset name or canonical directory (default ml-100k)"
    )
    parser.add_argument(
        "--replay-quantile",
        type=float,
        default=0.8,
        help="time quantile where the replay period starts (default 0.8)",
    )
    add_location_options(parser)
    add_json_option(parser)
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from recsys.cli.data_cmd import print_summary, summarize_dataset
    from recsys.data.registry import load_dataset
    from recsys.data.splits import time_split
    from recsys.features import build_item_features, summarise

    report: dict[str, Any] = {"dataset": args.dataset, "stages": {}}
    t0 = time.perf_counter()

    print(f"== 1. dataset {args.dataset}")
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    summary = summarize_dataset(ds)
    print_summary(summary)
    report["data"] = summary
    report["stages"]["data_s"] = round(time.perf_counter() - t0, 2)

    print(f"\n== 2. time split (replay period from the {args.replay_quantile:.0%} time quantile)")
    split = time_split(ds, quantile=args.replay_quantile)
    print_table([split.summary()])
    report["split"] = split.summary()

    t1 = time.perf_counter()
    print("\n== 3. item features")
    features = build_item_features(ds, cache_dir=args.cache_dir)
    rows = summarise(features)
    print_table(
        [{k: v for k, v in r.items() if v is not None} for r in rows],
        title=f"fused item features [{features.num_items}, {features.dim}]",
    )
    report["features"] = rows
    report["stages"]["features_s"] = round(time.perf_counter() - t1, 2)

    t2 = time.perf_counter()
    print("\n== 4. device ranker")
    report["ranker"] = _ranker_stage(ds, args.cache_dir)
    report["stages"]["ranker_s"] = round(time.perf_counter() - t2, 2)

    report["stages"]["total_s"] = round(time.perf_counter() - t0, 2)
    print(f"\ndemo finished in {report['stages']['total_s']:.1f} s")
    write_json(args.json, report)
    return 0


def _ranker_stage(ds: Any, cache_dir: str | None) -> dict[str, Any]:
    """Train the ranker (or reuse its checkpoint), evaluate it, show one user's top-5."""
    import numpy as np

    from device_ranker.evaluate import evaluate, evaluate_popularity, loo_eval_set
    from device_ranker.ranker import Ranker
    from device_ranker.train import TrainConfig, load_checkpoint, train
    from recsys import settings
    from recsys.data.splits import leave_one_out, user_sequences

    ckpt = settings.cache_dir(cache_dir) / "artifacts" / ds.name / "ranker.pt"
    reuse = ckpt.is_file() and load_checkpoint(ckpt)["dataset"]["fingerprint"] == ds.fingerprint()
    if reuse:
        print(f"reusing the trained ranker {ckpt}")
    else:
        print(f"training the ranker (leave-one-out training rows) -> {ckpt}")
        result = train(TrainConfig(), ds, checkpoint_path=ckpt)
        print(f"best epoch {result.best_epoch}, {result.seconds:.0f} s")
    ranker = Ranker.from_checkpoint(ckpt)
    split = leave_one_out(ds)
    test = loo_eval_set(ds, split, "test")
    ours = evaluate(lambda hs: ranker.scores(hs, edit="base"), test)
    pop = evaluate_popularity(ds, split.train, test)
    rows = [
        {"model": name, **{k: m[k] for k in ("hr@10", "ndcg@10", "mrr@10")}}
        for name, m in (("device ranker", ours), ("popularity", pop))
    ]
    print_table(rows, title=f"leave-one-out test, {len(test.targets)} users, seen items excluded")

    user = int(split.users[0])
    history = user_sequences(ds, np.concatenate([split.train, split.valid]))[user]
    rec = ranker.recommend(history, k=5)
    titles = ds.items["title"] if "title" in ds.items.columns else ds.items["item_id"]
    print_table(
        [
            {
                "rank": r + 1,
                "item_id": ds.item_ids[int(i)],
                "title": titles.iloc[int(i)],
                "score": float(sc),
            }
            for r, (i, sc) in enumerate(zip(rec.items, rec.scores, strict=True))
        ],
        title=f"top-5 for user {ds.user_ids[user]} ({len(history)} past events)",
    )
    return {"checkpoint_reused": reuse, "test": ours, "popularity": pop}
