"""``recsys demo``: the README's main job, run end to end on one dataset.

Stages so far (each reuses cached artefacts from earlier runs):

1. prepare the dataset (raw files -> canonical directory in the cache) and print its
   statistics, including the ml-1m text join's match rate;
2. the time split into a training period and a replay period;
3. the fused item-feature matrix (MiniLM text embeddings, cached; visual/audio where the
   dataset has them) and its summary.

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

    report["stages"]["total_s"] = round(time.perf_counter() - t0, 2)
    print(f"\ndemo finished in {report['stages']['total_s']:.1f} s")
    write_json(args.json, report)
    return 0
