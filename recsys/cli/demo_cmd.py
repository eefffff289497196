"""``recsys demo``: the README's main job, run end to end on one dataset.

Stages so far (each reuses cached artefacts from earlier runs):

1. prepare the dataset (raw files -> canonical directory in the cache) and print its
   statistics, including the ml-1m text join's match rate;
2. the time split into a training period and a replay period;
3. the fused item-feature matrix (MiniLM text embeddings, cached; visual/audio where the
   dataset has them) and its summary;
4. the TorchRec device ranker trained on the time split's training period (in a child
   process, while this process trains the semantic codebook and the codebook LM; each
   trained once, then reused), the ranker's quality on every warm user's first event
   after the cut next to popularity, and one user's top-5;
5. the adaptor with its prototypes (trained once, then reused), then the replay core's
   gRPC driver (``recsys replay --via grpc``) on a seeded sample of users, each user's
   first replay events: the cloud and one device server per policy (static, system
   with the request gate) as child processes on ephemeral loopback ports, every event
   through Recommend and RecordEvent (-> gate -> GenerateEdit), called with the typed
   client (``recsys.client.AsyncDeviceClient``: deadlines, retries on UNAVAILABLE); the
   core's tables of static vs adapted NDCG@10, edit requests, failures, fallbacks, bytes
   up/down and round-trip latencies, and a clean shutdown.

From nothing, the models train within the demo's time budgets (``DEMO_*_MINUTES``
below); ``recsys train ranker | lm | adaptor`` without ``--max-minutes`` train them to
convergence (the README's figures), and the demo then reuses those.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import add_json_option, add_location_options
from recsys.reporting import print_table, write_json


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
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small shared machine more threads "
        "oversubscribe the cores and make these small models many times slower)",
    )
    add_location_options(parser)
    add_json_option(parser)
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from recsys.cli.data_cmd import print_summary, summarize_dataset
    from recsys.data.registry import load_dataset
    from recsys.data.splits import time_split
    from recsys.features import build_item_features, summarise

    torch.set_num_threads(args.threads)
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
    print(
        "\n== 4. device ranker (time split) in a child process; semantic codebook and codebook LM"
    )
    report["models"] = _models_stage(ds, args)
    report["stages"]["models_s"] = round(time.perf_counter() - t2, 2)

    t3 = time.perf_counter()
    print("\n== 5. adaptor + prototypes; both gRPC services; replay through them")
    report["services"] = _services_stage(ds, args)
    report["stages"]["services_s"] = round(time.perf_counter() - t3, 2)

    report["stages"]["total_s"] = round(time.perf_counter() - t0, 2)
    print(f"\ndemo finished in {report['stages']['total_s']:.1f} s")
    print(
        "the demo's cloud model is the small from-scratch codebook LM; the pretrained LLM "
        f"(SmolLM2-135M reading item text): recsys train llm --dataset {args.dataset} "
        "--max-minutes 30 (README: 'A real pretrained LLM')"
    )
    write_json(args.json, report)
    return 0


# ---- stage 4: ranker, codebook and LM (issue 3, 4) --------------------------------------------
# Demo time budgets (minutes) for training from nothing; the full-budget commands
# (``recsys train ranker | lm | adaptor`` without ``--max-minutes``) give the README's figures.
DEMO_RANKER_MINUTES = 2.0
DEMO_LM_MINUTES = 2.0
DEMO_ADAPTOR_MINUTES = 0.5  # per generator (adaptor, DUET-style)


def _train_time_ranker(ds: Any, quantile: float, path: str, threads: int) -> dict[str, Any]:
    """Child-process body: train (or reuse) the time-split ranker with the demo budget."""
    import torch

    from device_ranker.train import TrainConfig
    from recsys.workflows.adaptor_data import ensure_time_ranker

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ensure_time_ranker(
        ds, quantile, Path(path), ranker_cfg=TrainConfig(max_minutes=DEMO_RANKER_MINUTES),
        progress=False,
    )  # fmt: skip
    return {"seconds": round(time.perf_counter() - t0, 1)}


def _models_stage(ds: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Stage 4: the time-split ranker trains in a child process while this process builds
    the codebook and the codebook LM (both single-threaded: two cores, two jobs)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from recsys import settings

    root = settings.cache_dir(args.cache_dir) / "artifacts" / ds.name
    ranker_path = root / "ranker-time.pt"
    t0 = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        job = pool.submit(
            _train_time_ranker, ds, args.replay_quantile, str(ranker_path), args.threads
        )
        print(f"device ranker (time split) -> {ranker_path} (child process)")
        made = _ensure_artifacts(ds, args, steps=("codebook", "lm"))
        made["ranker"] = job.result()
    made["ranker"]["wall_s_with_codebook_lm"] = round(time.perf_counter() - t0, 1)
    made["ranker"]["test"] = _ranker_table(ds, ranker_path, args.replay_quantile)
    return made


def _ranker_table(ds: Any, ranker_path: Path, quantile: float) -> dict[str, Any]:
    """Every replay-period event whose user has >= 5 earlier events (training period plus
    their own earlier replay events), ranked over the full catalogue with seen items
    excluded, next to popularity (training-period counts); and one user's top-5."""
    import numpy as np

    from device_ranker.evaluate import EvalSet, evaluate, evaluate_popularity
    from device_ranker.ranker import Ranker
    from recsys.data.splits import time_split, user_sequences

    split = time_split(ds, quantile=quantile)
    ranker = Ranker.from_checkpoint(ranker_path)
    seqs = user_sequences(ds, split.train)
    histories = [list(map(int, s)) for s in seqs]
    rows = np.concatenate([split.replay, split.cold_replay])
    rows = rows[np.argsort(ds.timestamps[rows], kind="stable")]
    ev_hist, ev_target, ev_user = [], [], []
    for r in rows.tolist():
        u, item = int(ds.user_index[r]), int(ds.item_index[r])
        if len(histories[u]) >= 5:
            ev_hist.append(np.asarray(histories[u], dtype=np.int64))
            ev_target.append(item)
            ev_user.append(u)
        histories[u].append(item)
    if not ev_target:
        print("no replay events with 5 earlier events: nothing to evaluate the ranker on")
        return {"events": 0}
    test = EvalSet(ev_hist, np.asarray(ev_target), np.asarray(ev_user))
    ours = evaluate(lambda hs: ranker.scores(hs, edit="base"), test)
    pop = evaluate_popularity(ds, split.train, test)
    users = np.unique(test.users)
    print_table(
        [
            {"model": name, **{k: m[k] for k in ("hr@10", "ndcg@10", "mrr@10")}}
            for name, m in (("device ranker", ours), ("popularity", pop))
        ],
        title=f"replay period, {len(ev_target):,} events of {len(users)} users "
        "(next item from all earlier events, seen items excluded)",
    )
    user = int(np.argmax([len(q) for q in seqs]))
    rec = ranker.recommend(seqs[user], k=5)
    titles = ds.items["title"] if "title" in ds.items.columns else ds.items["item_id"]
    print_table(
        [
            {"rank": r + 1, "item_id": ds.item_ids[int(i)], "title": titles.iloc[int(i)],
             "score": float(sc)}
            for r, (i, sc) in enumerate(zip(rec.items, rec.scores, strict=True))
        ],
        title=f"top-5 for user {ds.user_ids[user]} ({len(seqs[user])} past events)",
    )  # fmt: skip
    return {
        "device ranker": ours, "popularity": pop, "events": len(ev_target), "users": len(users)
    }  # fmt: skip


# ---- stage 5: the gRPC services (issue 6) -----------------------------------------------------
DEMO_REPLAY_USERS = 100  # users replayed through the services (seeded sample)
DEMO_MAX_EVENTS = 40  # replay events per user at most (each user's first ones)
DEMO_CONCURRENCY = 8  # users replayed at once (their events stay in order)
DEMO_BUDGET = 0.2  # the request gate's budget (threshold calibrated on the training period)
DEMO_CLOUD_DEADLINE_S = 5.0  # a slower edit fails; the device keeps serving (a fallback)


def _ensure_artifacts(
    ds: Any, args: argparse.Namespace, steps: tuple[str, ...] = ("codebook", "lm", "adaptor")
) -> dict[str, Any]:
    """Codebook, LM and adaptor (+ prototypes): reuse them, or train each one once through
    its own command (``recsys train codebook | lm | adaptor``) within the demo's budget."""
    from recsys import settings
    from recsys.cli import main as cli_main

    root = settings.cache_dir(args.cache_dir) / "artifacts" / ds.name
    loc = [*(["--data-dir", args.data_dir] if args.data_dir else []),
           *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]  # fmt: skip
    threads = ["--threads", str(args.threads)]
    known = {
        "codebook": (root / "codebook" / "semantic_ids.npy",
                     ["train", "codebook", "--dataset", args.dataset]),
        "lm": (root / "lm" / "recsys_lm.json",
               ["train", "lm", "--dataset", args.dataset, *threads,
                "--max-minutes", str(DEMO_LM_MINUTES)]),
        "adaptor": (root / "adaptor" / "adaptor.pt",
                    ["train", "adaptor", "--dataset", args.dataset, *threads,
                     "--max-minutes", str(DEMO_ADAPTOR_MINUTES), "--no-progress"]),
    }  # fmt: skip
    out: dict[str, Any] = {}
    adaptor_ready = known["adaptor"][0].is_file()
    for name in steps:
        marker, argv = known[name]
        t0 = time.perf_counter()
        if name == "lm" and adaptor_ready and not marker.is_file():
            print("no codebook LM, and none needed: the adaptor artefact exists already")
            out[name] = {"reused": False, "skipped": True}
            continue
        if marker.is_file():
            print(f"reusing the {name} {marker.parent}")
            out[name] = {"reused": True, "path": str(marker.parent)}
            continue
        print(f"training the {name}: recsys {' '.join(argv)}")
        code = cli_main([*argv, *loc])
        if code != 0 or not marker.is_file():
            print(f"the {name} could not be trained (exit code {code}); see the messages above")
            out[name] = {"reused": False, "failed": True}
            continue
        out[name] = {"reused": False, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _services_stage(ds: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Stage 5: the replay core's gRPC driver on a sample of users: the cloud and one
    device server per policy (static, system with the gate) as child processes on
    loopback ports, every event through Recommend and RecordEvent (-> gate ->
    GenerateEdit), then the core's summary and a clean shutdown."""
    from codebook.adaptor_artifact import load_artifact
    from recsys import settings
    from recsys.replay.config import GrpcOptions, PolicySpec, ReplayConfig
    from recsys.replay.engine import run_replay
    from recsys.replay.report import quality_rows, service_rows, summarise

    made = _ensure_artifacts(ds, args, steps=("adaptor",))
    cache = settings.cache_dir(args.cache_dir)
    adaptor_path = cache / "artifacts" / ds.name / "adaptor" / "adaptor.pt"
    if not adaptor_path.is_file():
        print(f"skipping the services: no adaptor artefact at {adaptor_path}")
        return {"artifacts": made, "skipped": "no adaptor artefact"}
    quantile = float(load_artifact(adaptor_path)["config"]["quantile"])
    cfg = ReplayConfig(
        quantile=quantile, max_users=DEMO_REPLAY_USERS, max_events=DEMO_MAX_EVENTS, seed=0
    )
    specs = [
        PolicySpec(kind="static"),
        PolicySpec(kind="system", trigger="gate", budget=DEMO_BUDGET),
    ]
    options = GrpcOptions(
        concurrency=DEMO_CONCURRENCY, cloud_deadline_s=DEMO_CLOUD_DEADLINE_S, rpc_timeout_s=60.0,
        strict=False, prestart=True,
    )  # fmt: skip
    run = run_replay(ds, cfg, specs, cache=cache, via="grpc", grpc=options)
    summary = summarise(run)
    st = summary["meta"]["stream"]
    print_table(
        quality_rows(summary),
        title=f"replay through gRPC: {st['stream_users']} users, {st['evaluated_events']:,} "
        f"evaluated events (full catalogue, seen items excluded; adaptor tokens: "
        f"{summary['meta']['token_source']})",
    )
    print_table(service_rows(summary), title="services: edit requests, bytes, round trips")
    servers = summary["meta"]["servers"]
    print(
        "servers: "
        + ", ".join(
            f"{name} ready in {s.get('startup_s', float('nan')):.0f} s, exit code "
            f"{s.get('exit_code')}"
            for name, s in servers.items()
        )
    )
    keep = ("events", "ndcg@10", "hr@10", "ndcg@10_diff_ci95", "requests", "failed_requests",
            "fallback_answers", "uplink_bytes_per_request", "downlink_bytes_per_request",
            "recommend_ms_p50", "recommend_ms_p99", "record_event_ms_p50", "record_event_ms_p99")  # fmt: skip
    return {
        "artifacts": made,
        "token_source": summary["meta"]["token_source"],
        "stream": st,
        "policies": {
            label: {k: p[k] for k in keep if k in p} for label, p in summary["policies"].items()
        },
        "servers": {n: {k: v for k, v in s.items() if k != "argv"} for n, s in servers.items()},
        "seconds": summary["meta"]["seconds"],
    }
