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
5. the adaptor with its prototypes (trained once, then reused), then the cloud and
   device gRPC servers as child processes
   on ephemeral loopback ports, a sample of users' replay-period events sent through
   them (Recommend static and adapted, RecordEvent -> gate -> GenerateEdit), a table of
   static vs adapted NDCG@10, bytes up/down and latency, and a clean shutdown.

From nothing, the models train within the demo's time budgets (``DEMO_*_MINUTES``
below); ``recsys train ranker | lm | adaptor`` without ``--max-minutes`` train them to
convergence (the README's figures), and the demo then reuses those.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
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
DEMO_REPLAY_USERS = 100  # users replayed through the services
DEMO_MAX_EVENTS = 40  # replay events per user at most
DEMO_CONCURRENCY = 8  # users replayed at once (their events stay in order)


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
    """Stage 5: both services as child processes, a replay through gRPC, a table."""
    import asyncio
    import shutil
    import tempfile

    from recsys import settings
    from recsys.serving.process import ServerProcess
    from recsys.workflows.adaptor_training import load_artifact

    made = _ensure_artifacts(ds, args, steps=("adaptor",))
    root = settings.cache_dir(args.cache_dir) / "artifacts" / ds.name
    adaptor_path = root / "adaptor" / "adaptor.pt"
    if not adaptor_path.is_file():
        print(f"skipping the services: no adaptor artefact at {adaptor_path}")
        return {"artifacts": made, "skipped": "no adaptor artefact"}
    art = load_artifact(adaptor_path)
    ranker_path = Path(art["ranker_path"])
    bounds = art["bounds"]
    quantile = float(art["config"]["quantile"])
    stride = int(art["config"]["windows"]["stride"])
    loc = [*(["--data-dir", args.data_dir] if args.data_dir else []),
           *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]  # fmt: skip
    report: dict[str, Any] = {"artifacts": made, "token_source": art.get("token_source")}
    with tempfile.TemporaryDirectory(prefix="recsys-demo-") as tmp:
        # the demo refines a copy of the trained prototypes: reruns start from the same state
        store = Path(tmp) / "prototypes.sqlite"
        src = Path(str(art.get("store_url", "")).removeprefix("sqlite:///"))
        store_args = []
        if src.is_file():
            shutil.copy(src, store)
            store_args = ["--store-url", f"sqlite:///{store}"]
        cloud = ServerProcess(
            ["serve", "cloud", "--engine", "artifacts", "--dataset", args.dataset,
             "--adaptor", str(adaptor_path), *store_args, *loc],
            name="cloud", log_path=Path(tmp) / "cloud.log",
        )  # fmt: skip
        device = None
        t0 = time.perf_counter()
        try:
            cloud.start().wait_port(timeout=120)  # bound at once; the engine loads meanwhile
            device = ServerProcess(
                ["serve", "device", "--checkpoint", str(ranker_path), "--dataset", args.dataset,
                 "--seed-quantile", str(quantile), "--cloud", cloud.target,
                 "--cloud-deadline", "5", "--gate-min-gap", str(stride),
                 "--max-weight-norm", str(bounds["device_max_weight_norm"]),
                 "--max-bias-abs", str(bounds["device_max_bias_abs"]), *loc],
                name="device", log_path=Path(tmp) / "device.log",
            ).start()  # fmt: skip
            cloud.wait_ready(timeout=600)
            device.wait_ready(timeout=600)
            report["startup_s"] = round(time.perf_counter() - t0, 1)
            print(f"cloud on {cloud.target}, device on {device.target} "
                  f"(both ready in {report['startup_s']:.0f} s)")  # fmt: skip
            events = _replay_events(ds, quantile)
            report.update(asyncio.run(_replay(device.target, events)))
        finally:
            codes = {}
            if device is not None:
                codes["device"] = device.stop()
                device.close()
            codes["cloud"] = cloud.stop()
            cloud.close()
            report["exit_codes"] = codes
    _print_services(report)
    return report


def _replay_events(ds: Any, quantile: float) -> dict[str, list[tuple[str, int]]]:
    """A seeded sample of warm replay-period users: their events (item id, time) in order."""
    import numpy as np

    from recsys.data.splits import time_split

    split = time_split(ds, quantile=quantile)
    rows = np.sort(split.replay)
    by_user: dict[str, list[tuple[str, int]]] = {}
    for r in rows.tolist():
        user = str(ds.user_ids[ds.user_index[r]])
        by_user.setdefault(user, []).append(
            (str(ds.item_ids[ds.item_index[r]]), int(ds.timestamps[r]))
        )
    users = sorted(by_user)
    pick = np.random.default_rng(0).choice(
        len(users), min(DEMO_REPLAY_USERS, len(users)), replace=False
    )
    return {users[i]: by_user[users[i]][:DEMO_MAX_EVENTS] for i in sorted(pick.tolist())}


def _ndcg_hit(items: list[str], target: str) -> tuple[float, float]:
    import math

    for rank, item in enumerate(items, start=1):
        if item == target:
            return 1.0 / math.log2(rank + 1), 1.0
    return 0.0, 0.0


async def _replay(target: str, events: dict[str, list[tuple[str, int]]]) -> dict[str, Any]:
    """Each event: Recommend (static, then adapted) scores the true item, then RecordEvent
    (the gate may fetch an edit; the call waits for it, so the replay is deterministic)."""
    import asyncio

    import numpy as np

    from recsys.rpc.device.v1 import recommendation_pb2 as pb
    from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
    from recsys.serving.server import client_channel

    metrics = {"static": [0.0, 0.0], "adapted": [0.0, 0.0]}
    lat: dict[str, list[float]] = {"recommend": [], "record": [], "record_edit": []}
    counts = {"events": 0, "edits_applied": 0, "edit_failures": 0, "fallback_answers": 0}
    async with client_channel(target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)

        async def user_replay(user: str, evs: list[tuple[str, int]]) -> None:
            for item, ts in evs:
                static = await stub.Recommend(
                    pb.RecommendRequest(user_id=user, k=10, base_model=True), timeout=10
                )
                t0 = time.perf_counter()
                adapted = await stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=10)
                lat["recommend"].append((time.perf_counter() - t0) * 1000)
                for arm, reply in (("static", static), ("adapted", adapted)):
                    n, h = _ndcg_hit([it.item_id for it in reply.items], item)
                    metrics[arm][0] += n
                    metrics[arm][1] += h
                counts["fallback_answers"] += int(adapted.fallback)
                t0 = time.perf_counter()
                ev = await stub.RecordEvent(
                    pb.RecordEventRequest(
                        user_id=user, item_id=item, timestamp=ts, wait_for_edit=True
                    ),
                    timeout=30,
                )
                ms = (time.perf_counter() - t0) * 1000
                lat["record_edit" if ev.edit_requested else "record"].append(ms)
                counts["edits_applied"] += int(ev.outcome == pb.EDIT_OUTCOME_APPLIED)
                counts["edit_failures"] += int(ev.outcome == pb.EDIT_OUTCOME_FAILED)
                counts["events"] += 1

        slots = asyncio.Semaphore(DEMO_CONCURRENCY)

        async def bounded(user: str, evs: list[tuple[str, int]]) -> None:
            async with slots:
                await user_replay(user, evs)

        t0 = time.perf_counter()
        await asyncio.gather(*(bounded(u, evs) for u, evs in events.items()))
        seconds = time.perf_counter() - t0
        status = await stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    n = max(counts["events"], 1)

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "users": len(events),
        **counts,
        "replay_s": round(seconds, 1),
        "ndcg@10": {arm: m[0] / n for arm, m in metrics.items()},
        "hr@10": {arm: m[1] / n for arm, m in metrics.items()},
        "edit_requests": int(status.edit_requests),
        "bytes_up": int(status.bytes_up),
        "bytes_down": int(status.bytes_down),
        "latency_ms": {
            name: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for name, v in lat.items()
        },
    }


def _print_services(report: dict[str, Any]) -> None:
    if "ndcg@10" not in report:
        return
    requests = max(report["edit_requests"], 1)
    print_table(
        [
            {"arm": "static (base ranker)", "NDCG@10": report["ndcg@10"]["static"],
             "HR@10": report["hr@10"]["static"]},
            {"arm": "adapted (cloud edits)", "NDCG@10": report["ndcg@10"]["adapted"],
             "HR@10": report["hr@10"]["adapted"]},
        ],
        title=f"replay through gRPC: {report['users']} users, {report['events']} events "
        f"(full catalogue, seen items excluded; adaptor tokens: {report['token_source']})",
    )  # fmt: skip
    lat = report["latency_ms"]
    print_table(
        [
            {"figure": "edit requests (gate) / events", "value": f"{report['edit_requests']} / {report['events']}"},
            {"figure": "edits applied / failed", "value": f"{report['edits_applied']} / {report['edit_failures']}"},
            {"figure": "bytes up per request (protobuf)", "value": f"{report['bytes_up'] / requests:,.0f}"},
            {"figure": "bytes down per request (protobuf)", "value": f"{report['bytes_down'] / requests:,.0f}"},
            {"figure": "Recommend latency p50 / p99 (ms)",
             "value": f"{lat['recommend']['p50']:.2f} / {lat['recommend']['p99']:.2f}"},
            {"figure": "RecordEvent + edit request p50 / p99 (ms)",
             "value": f"{lat['record_edit']['p50']:.1f} / {lat['record_edit']['p99']:.1f}"},
            {"figure": "RecordEvent, no request p50 (ms)", "value": f"{lat['record']['p50']:.2f}"},
            {"figure": "fallback answers", "value": str(report["fallback_answers"])},
        ],
        title=f"services: replay {report['replay_s']:.0f} s, startup {report['startup_s']:.0f} s, "
        f"clean exit codes {report['exit_codes']}",
    )  # fmt: skip
