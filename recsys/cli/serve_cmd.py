"""``recsys serve cloud``, ``recsys serve device`` and ``recsys bench serve``: the gRPC services.

recsys serve cloud  [--engine artifacts|tiny] [--dataset ml-100k] [--adaptor PATH] [--port N] ...
recsys serve device [--checkpoint PATH] [--dataset ml-100k] [--cloud HOST:PORT] [--port N]
                    [--experiment FILE --event-log PATH] ...
recsys bench serve  [--dataset ml-100k] [--concurrency 32] [--duration 10] [--rate 1000] [--json PATH]

Both servers bind 127.0.0.1 by default, answer the standard health check (NOT_SERVING
until their models are loaded) and server reflection, and stop gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import add_json_option, add_location_options, print_table, write_json

logger = logging.getLogger(__name__)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``cloud`` and ``device`` to ``serve`` and ``serve`` to ``bench``."""
    p = groups["serve"].add_parser(
        "cloud",
        help="run the cloud AdaptationService (LM tokens -> adaptor -> prototype-relative edits)",
        description="Serve recsys.cloud.v1.AdaptationService: GenerateEdit (micro-batched), "
        "GetPrototype, ListPrototypes, plus health checking and reflection. The 'artifacts' "
        "engine loads `recsys train adaptor`'s artefact (adaptor, prototypes, store) and the "
        "codebook LM when the adaptor was trained on its tokens; 'tiny' is an untrained toy "
        "engine over a dataset's catalogue, for tests and smoke runs.",
    )
    p.add_argument(
        "--engine", choices=("artifacts", "tiny"), default="artifacts", help="(default artifacts)"
    )
    p.add_argument(
        "--dataset",
        default="ml-100k",
        help="dataset (default ml-100k): locates the artefacts, or the tiny engine's catalogue",
    )
    p.add_argument(
        "--adaptor", help="adaptor artefact (default CACHE_DIR/artifacts/NAME/adaptor/adaptor.pt)"
    )
    p.add_argument("--codebook-dir", help="semantic IDs (default: artifacts/NAME/codebook)")
    p.add_argument("--lm-dir", help="codebook LM (default: artifacts/NAME/lm)")
    p.add_argument(
        "--lm-backend",
        default="transformers",
        choices=("transformers", "vllm", "openai"),
        help="how the LM runs (default transformers; vllm needs .venv-vllm)",
    )
    p.add_argument("--lm-url", help="OpenAI-compatible server URL for --lm-backend openai")
    p.add_argument(
        "--store-url",
        help="prototype store URL (default: the store the adaptor training wrote; tiny: none)",
    )
    p.add_argument(
        "--no-prototypes", action="store_true", help="send absolute edits (no prototype bank)"
    )
    p.add_argument(
        "--head-spec",
        default="fc0=128x64,fc1=64x128",
        help="tiny engine: the ranker head, 'fc0=OUTxIN,fc1=OUTxIN' (default: ml-100k's)",
    )
    p.add_argument("--seed", type=int, default=0, help="tiny engine seed (default 0)")
    p.add_argument(
        "--batch-max",
        type=int,
        default=32,
        help="GenerateEdit calls per engine call (default 32; 1 = micro-batching off)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more calls, ms (default 5)",
    )
    p.add_argument(
        "--payload-dtype",
        choices=("fp16", "int8", "fp32"),
        default="fp16",
        help="edit precision when a request does not choose (default fp16)",
    )
    p.add_argument(
        "--token-file",
        help="require the shared token in this file from callers (authorization: Bearer)",
    )
    _add_server_options(p, default_port=50051)
    add_location_options(p)
    p.set_defaults(handler=cmd_serve_cloud)

    p = groups["serve"].add_parser(
        "device",
        help="run the device RecommendationService (TorchRec ranker + edits + request gate)",
        description="Serve recsys.device.v1.RecommendationService: Recommend (micro-batched, "
        "per-user edits), RecordEvent (request gate -> GenerateEdit on the cloud with a "
        "deadline), GetStatus, ApplyEdit, plus health checking and reflection. Users are "
        "seeded with their training-period history from --dataset. When the cloud is slow "
        "or down, users keep their last good edit (or the base model) and responses say so. "
        "With --experiment, each user's arm (static, or adapted with its trigger and budget) "
        "comes from the experiment's hash assignment, persisted in the store; --event-log "
        "records every event for `recsys abtest analyze --events`.",
    )
    p.add_argument(
        "--checkpoint",
        help="ranker checkpoint (default CACHE_DIR/artifacts/NAME/ranker-time.pt, else ranker.pt)",
    )
    p.add_argument(
        "--dataset", default="ml-100k", help="dataset whose users are seeded (default ml-100k)"
    )
    p.add_argument(
        "--seed-histories",
        choices=("time", "all", "none"),
        default="time",
        help="events that seed the users' histories (default time: the training period)",
    )
    p.add_argument(
        "--seed-quantile", type=float, default=0.8, help="time split quantile (default 0.8)"
    )
    p.add_argument(
        "--history-len", type=int, default=200, help="events kept per user (default 200)"
    )
    p.add_argument("--max-k", type=int, default=1000, help="largest k (default 1000)")
    p.add_argument(
        "--max-candidates", type=int, default=10_000, help="largest candidate list (default 10000)"
    )
    p.add_argument("--max-weight-norm", type=float, help="edit bound ||dW||_F per layer")
    p.add_argument("--max-bias-abs", type=float, help="edit bound max |db|")
    p.add_argument(
        "--rank-batch",
        type=int,
        default=64,
        help="Recommend calls ranked in one pass at most (default 64; 1 = off)",
    )
    p.add_argument(
        "--rank-inline",
        action="store_true",
        help="rank on the event loop's thread instead of a worker thread",
    )
    p.add_argument(
        "--rank-wait-ms",
        type=float,
        default=2.0,
        help="how long a ranking batch waits for more calls, ms (default 2)",
    )
    g = p.add_argument_group("request gate (device_ranker.gate)")
    g.add_argument(
        "--gate-budget", type=float, default=0.2, help="target request rate per event (default 0.2)"
    )
    g.add_argument("--gate-window", type=int, default=10, help="recent window, events (default 10)")
    g.add_argument(
        "--gate-min-history", type=int, default=5, help="events before a first request (default 5)"
    )
    g.add_argument(
        "--gate-min-gap", type=int, default=5, help="events between requests (default 5)"
    )
    g.add_argument(
        "--gate-threshold",
        type=float,
        help="fixed shift threshold in [0, 1] (overrides the budget)",
    )
    g.add_argument(
        "--gate-trigger",
        choices=("gate", "timer"),
        default="gate",
        help="gate: the shift gate; timer: a request every round(1/budget) events, the "
        "baseline the gate must beat (default gate)",
    )
    g = p.add_argument_group("link to the cloud")
    g.add_argument("--cloud", help="cloud host:port (default: none, base model only)")
    g.add_argument(
        "--cloud-deadline", type=float, default=1.0, help="GenerateEdit deadline, s (default 1)"
    )
    g.add_argument(
        "--probe-interval", type=float, default=1.0, help="cloud health probe period, s (default 1)"
    )
    g.add_argument("--cloud-token-file", help="shared token sent to the cloud")
    g.add_argument("--cloud-tls-ca", help="trust this PEM for the cloud's TLS certificate (TLS on)")
    g.add_argument("--cloud-tls-name", help="name expected in the cloud's certificate")
    g.add_argument(
        "--payload-dtype",
        choices=("fp16", "int8", "fp32"),
        default="fp16",
        help="downlink precision (default fp16)",
    )
    g.add_argument(
        "--no-summary", action="store_true", help="send only item ids up (no summary vector)"
    )
    g.add_argument(
        "--recent-items",
        type=int,
        default=50,
        help="recent item ids a GenerateEdit request carries (default 50)",
    )
    g.add_argument(
        "--summary-items",
        type=int,
        default=10,
        help="recent items pooled into the summary vector (default 10)",
    )
    g = p.add_argument_group("A/B experiment and evaluation")
    g.add_argument(
        "--experiment",
        metavar="FILE",
        help="serve an experiment (recsys abtest file): each user's arm (hashed from the "
        "salt, persisted in the store) decides static vs adapted and its gate budget",
    )
    g.add_argument(
        "--store-url",
        help="store of the experiment's arm assignments (default: RECSYS_DATABASE_URL or "
        "CACHE_DIR/store.sqlite)",
    )
    g.add_argument(
        "--event-log",
        metavar="PATH",
        help="append one JSON line per RecordEvent (user, arm, item, its rank under the "
        "served model, request, bytes) for `recsys abtest analyze`",
    )
    g.add_argument(
        "--max-probes",
        type=int,
        default=1000,
        help="largest probe list of a Recommend (evaluation scores and ranks; default 1000)",
    )
    _add_server_options(p, default_port=50052)
    add_location_options(p)
    p.set_defaults(handler=cmd_serve_device)

    p = groups["bench"].add_parser(
        "serve",
        help="load benchmark of the gRPC services over loopback (Recommend, GenerateEdit)",
        description="Start the device server (and the cloud server) as child processes, "
        "drive them from this process over loopback with grpc.aio clients: Recommend in a "
        "closed loop (max throughput) and an open loop at --rate (latency at that load), "
        "both at --concurrency; then GenerateEdit with micro-batching on and off. Prints "
        "throughput and p50/p95/p99 latency; --json writes every figure.",
    )
    p.add_argument("--dataset", default="ml-100k", help="dataset (default ml-100k)")
    p.add_argument("--checkpoint", help="ranker checkpoint (default: as for serve device)")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    p.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per phase (default 10)"
    )
    p.add_argument(
        "--warmup", type=float, default=2.0, help="seconds not counted per phase (default 2)"
    )
    p.add_argument(
        "--rate", type=float, default=1000.0, help="open-loop Recommend rate, 1/s (default 1000)"
    )
    p.add_argument("--k", type=int, default=10, help="k of Recommend (default 10)")
    p.add_argument(
        "--users", type=int, default=500, help="users the requests cycle over (default 500)"
    )
    p.add_argument(
        "--no-edits",
        action="store_true",
        help="rank with the base model (default: every user has an edit)",
    )
    p.add_argument(
        "--edit-engine",
        choices=("auto", "artifacts", "tiny"),
        default="auto",
        help="cloud engine for GenerateEdit (auto: artifacts if trained, else tiny)",
    )
    p.add_argument(
        "--edit-duration",
        type=float,
        default=8.0,
        help="measured seconds per GenerateEdit phase (default 8)",
    )
    p.add_argument("--skip-edits", action="store_true", help="skip the GenerateEdit phases")
    p.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads in the servers (default 1)"
    )
    add_location_options(p)
    add_json_option(p)
    p.set_defaults(handler=cmd_bench_serve)


def _add_server_options(p: argparse.ArgumentParser, default_port: int) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    g.add_argument(
        "--port",
        type=int,
        default=default_port,
        help=f"TCP port (default {default_port}; 0 = any free)",
    )
    g.add_argument("--port-file", help="write the bound port here once listening")
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=4 * 2**20,
        help="message size limit (default 4 MiB)",
    )
    g.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds in-flight calls get on SIGTERM (default 5)",
    )
    g.add_argument("--tls-cert", help="PEM certificate (with --tls-key: TLS on)")
    g.add_argument("--tls-key", help="PEM private key")
    g.add_argument("--max-concurrent-rpcs", type=int, help="calls served at once (default: no cap)")
    g.add_argument(
        "--torch-threads", type=int, default=1, help="torch intra-op threads (default 1)"
    )


def _server_options(args: argparse.Namespace) -> Any:
    from recsys.serving.server import ServerOptions

    return ServerOptions(
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        port_file=args.port_file,
    )


def _artifacts(args: argparse.Namespace) -> Path:
    from recsys import settings

    return settings.cache_dir(args.cache_dir) / "artifacts" / Path(args.dataset).name


def default_checkpoint(args: argparse.Namespace) -> Path:
    """``--checkpoint``, else the time-split ranker (what the adaptor's edits fit), else the
    leave-one-out ranker."""
    if getattr(args, "checkpoint", None):
        return Path(args.checkpoint)
    root = _artifacts(args)
    for name in ("ranker-time.pt", "ranker.pt"):
        if (root / name).is_file():
            return root / name
    from recsys.errors import NotFoundError

    raise NotFoundError(
        f"no ranker checkpoint in {root}; run `recsys train ranker --dataset {args.dataset}` "
        "or pass --checkpoint"
    )


def cmd_serve_cloud(args: argparse.Namespace) -> int:
    from llm_cloud.service.engine import ArtifactEngineConfig
    from llm_cloud.service.server import CloudConfig, serve_cloud
    from recsys.serving.batching import BatchConfig

    artifacts = None
    if args.engine == "artifacts":
        artifacts = ArtifactEngineConfig(
            adaptor_path=args.adaptor or str(_artifacts(args) / "adaptor" / "adaptor.pt"),
            codebook_dir=args.codebook_dir,
            lm_dir=args.lm_dir,
            lm_backend=args.lm_backend,
            lm_options={"url": args.lm_url} if args.lm_url else {},
            store_url=args.store_url,
            prototypes=not args.no_prototypes,
        )
    config = CloudConfig(
        engine=args.engine,
        artifacts=artifacts,
        dataset=args.dataset,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        head_spec=args.head_spec,
        store_url=args.store_url,
        seed=args.seed,
        batch=BatchConfig(max_batch=args.batch_max, max_wait_ms=args.batch_wait_ms),
        default_dtype=args.payload_dtype,
        token_file=args.token_file,
        torch_threads=args.torch_threads,
        server=_server_options(args),
    )
    asyncio.run(serve_cloud(config))
    return 0


def cmd_serve_device(args: argparse.Namespace) -> int:
    from device_ranker.gate import GateConfig
    from device_ranker.service.config import CloudLinkConfig, DeviceConfig
    from device_ranker.service.server import serve_device
    from recsys.serving.batching import BatchConfig

    experiment, arm_for = None, None
    if args.experiment:
        experiment, arm_for = experiment_arms(args.experiment, args.store_url)

    config = DeviceConfig(
        checkpoint=str(default_checkpoint(args)),
        dataset=args.dataset if args.seed_histories != "none" else None,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        seed_histories=args.seed_histories,
        seed_quantile=args.seed_quantile,
        history_len=args.history_len,
        max_k=args.max_k,
        max_candidates=args.max_candidates,
        max_probes=args.max_probes,
        max_weight_norm=args.max_weight_norm,
        max_bias_abs=args.max_bias_abs,
        torch_threads=args.torch_threads,
        rank_batch=BatchConfig(max_batch=args.rank_batch, max_wait_ms=args.rank_wait_ms),
        rank_inline=args.rank_inline,
        experiment=experiment,
        event_log=args.event_log,
        trigger=args.gate_trigger,
        gate=GateConfig(
            budget=args.gate_budget,
            window=args.gate_window,
            min_history=args.gate_min_history,
            min_gap=args.gate_min_gap,
            threshold=args.gate_threshold,
        ),
        cloud=CloudLinkConfig(
            target=args.cloud,
            deadline_s=args.cloud_deadline,
            probe_interval_s=args.probe_interval,
            token_file=args.cloud_token_file,
            tls_ca=args.cloud_tls_ca,
            tls_server_name=args.cloud_tls_name,
            payload_dtype=args.payload_dtype,
            recent_items=args.recent_items,
            summary_items=args.summary_items,
            send_summary=not args.no_summary,
        ),
        server=_server_options(args),
    )
    asyncio.run(serve_device(config, arm_for=arm_for))
    return 0


def experiment_arms(path: str, store_url: str | None) -> tuple[str, Any]:
    """(experiment name, arm resolver) for ``serve device --experiment``.

    The resolver hashes (salt, user) to an arm (``recsys.abtest.assignment.assign_arm``)
    and persists it with ``PrototypeStore.get_or_create_arm``, so a user keeps the arm
    first stored for it (also across restarts and replicas sharing the store).
    """
    from codebook.store import PrototypeStore
    from device_ranker.service.policy import ArmPolicy
    from recsys import settings
    from recsys.abtest.assignment import assign_arm
    from recsys.abtest.experiment import load_experiment
    from recsys.abtest.persist import stored_config

    exp = load_experiment(path)
    policies = {arm.name: dict(arm.policy) for arm in exp.arms}
    for policy in policies.values():  # fail at start-up, not at a user's first call
        ArmPolicy.from_dict(policy)
    weights = [(arm.name, float(arm.weight)) for arm in exp.arms]
    store = PrototypeStore.open(settings.database_url(store_url), upgrade=True)
    # the same stored config as `recsys abtest run`, so both can share one store
    record = store.create_experiment(exp.name, exp.salt, stored_config(exp), exist_ok=True)

    def arm_for(user_id: str) -> tuple[str, dict[str, Any]]:
        arm = store.get_or_create_arm(record.id, user_id, assign_arm(exp.salt, user_id, weights))
        if arm.arm not in policies:
            from recsys.errors import ValidationError

            raise ValidationError(
                f"user {user_id!r} is stored in arm {arm.arm!r}, which experiment {exp.name!r} "
                "no longer has; start a new experiment (a new name) to change the arms"
            )
        return arm.arm, policies[arm.arm]

    logger.info("experiment %r: arms %s, store %s", exp.name, weights, store.engine.url)
    return exp.name, arm_for


# ---- bench serve ---------------------------------------------------------------------------------
def cmd_bench_serve(args: argparse.Namespace) -> int:
    from recsys.serving.process import ServerProcess

    if args.concurrency < 1 or args.duration <= 0 or args.users < 1:
        from recsys.errors import ValidationError

        raise ValidationError("--concurrency, --users >= 1 and --duration > 0 required")
    t0 = time.perf_counter()
    ckpt = default_checkpoint(args)
    work = _BenchData.load(args, ckpt)
    loc = []
    if args.data_dir:
        loc += ["--data-dir", args.data_dir]
    if args.cache_dir:
        loc += ["--cache-dir", args.cache_dir]
    report: dict[str, Any] = {
        "dataset": args.dataset,
        "checkpoint": str(ckpt),
        "num_items": work.num_items,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "k": args.k,
        "users": len(work.users),
        "with_edits": not args.no_edits,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    device = ServerProcess(
        ["serve", "device", "--checkpoint", str(ckpt), "--dataset", args.dataset,
         "--torch-threads", str(args.torch_threads), *loc],
        name="device",
    )  # fmt: skip
    gc.collect()
    gc.freeze()  # the load generator's own heap (dataset, ranker) stays out of GC passes
    with device:
        device.wait_ready(timeout=300)
        report["recommend"] = asyncio.run(_bench_recommend(args, work, device))
    rows = [
        {
            "phase": r["mode"],
            "concurrency": r["concurrency"],
            "offered_rps": "max" if r["offered_rps"] is None else f"{r['offered_rps']:,.0f}",
            "requests": r["requests"],
            "errors": r["errors"],
            "throughput_rps": r["throughput_rps"],
            "p50_ms": r["p50_ms"],
            "p95_ms": r["p95_ms"],
            "p99_ms": r["p99_ms"],
            "server_cpu_ms": r.get("server_cpu_ms_per_call", float("nan")),
            "client_cpu_ms": r["client_cpu_ms_per_call"],
        }
        for r in report["recommend"]
    ]
    print_table(
        rows,
        title=f"Recommend over loopback: {work.num_items} items (full catalogue), k={args.k}, "
        f"{len(work.users)} users, {'per-user edits' if not args.no_edits else 'base model'}, "
        f"device server in a child process ({args.torch_threads} torch thread), "
        f"client: grpc.aio in this process, {args.duration:.0f} s per phase",
    )
    open_loop = report["recommend"][-1]
    met = (
        open_loop["throughput_rps"] >= 1000
        and open_loop["p99_ms"] < 20
        and open_loop["errors"] == 0
        and args.concurrency >= 32
    )
    report["goal_met"] = met
    print(
        f"goal (>= 1,000 req/s with p99 < 20 ms at 32 concurrent clients): "
        f"{'met' if met else 'NOT met'} ({open_loop['throughput_rps']:,.0f} req/s, "
        f"p99 {open_loop['p99_ms']:.2f} ms at {args.concurrency} in flight)"
    )

    if not args.skip_edits:
        report["generate_edit"] = _bench_edits(args, work, loc)
        rows = [
            {
                "batching": r["batching"],
                "max_batch": r["max_batch"],
                "wait_ms": r["wait_ms"],
                "requests": r["requests"],
                "errors": r["errors"],
                "throughput_rps": r["throughput_rps"],
                "p50_ms": r["p50_ms"],
                "p95_ms": r["p95_ms"],
                "p99_ms": r["p99_ms"],
                "mean_batch": r["mean_batch"],
            }
            for r in report["generate_edit"]
        ]
        engine = report["generate_edit"][0]["engine"] if report["generate_edit"] else "?"
        print_table(
            rows,
            title=f"GenerateEdit over loopback: engine {engine}, closed loop at "
            f"{args.concurrency} in flight, {args.edit_duration:.0f} s per phase",
        )
        on, off = report["generate_edit"]
        if off["throughput_rps"]:
            report["batching_speedup"] = on["throughput_rps"] / off["throughput_rps"]
            print(f"micro-batching speed-up: x{report['batching_speedup']:.2f} throughput")
    report["seconds"] = time.perf_counter() - t0
    print(f"(bench {report['seconds']:.0f} s; load average before: "
          f"{', '.join(f'{x:.1f}' for x in report['load_average'])} on {os.cpu_count()} cores)")  # fmt: skip
    write_json(args.json, report)
    return 0


class _BenchData:
    """Users, their histories, edits and summaries for the benchmark requests."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.recent: list[list[str]] = []
        self.summaries: list[list[float]] = []
        self.edits: list[bytes] = []
        self.num_items = 0
        self.spec: dict[str, tuple[int, int]] = {}

    @classmethod
    def load(cls, args: argparse.Namespace, ckpt: Path) -> _BenchData:
        import numpy as np
        import torch

        from device_ranker.edits import random_edit
        from device_ranker.ranker import Ranker
        from device_ranker.service.cloud_edits import device_summary
        from recsys.data import time_split
        from recsys.data.registry import load_dataset
        from recsys.edit_payload import encode_payload

        torch.set_num_threads(1)
        ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
        ranker = Ranker.from_checkpoint(ckpt)
        rows = np.sort(time_split(ds, quantile=0.8).train)
        users = ds.user_index[rows]
        seqs: dict[int, list[int]] = {}
        for u, i in zip(users.tolist(), ds.item_index[rows].tolist(), strict=True):
            seqs.setdefault(u, []).append(i)
        order = [u for u in sorted(seqs) if len(seqs[u]) >= 5][: args.users]
        out = cls()
        out.num_items = ranker.num_items
        out.spec = ranker.edit_spec()
        gen = torch.Generator().manual_seed(0)
        for u in order:
            hist = seqs[u]
            out.users.append(str(ds.user_ids[u]))
            out.recent.append([str(ds.item_ids[i]) for i in hist[-50:]])
            out.summaries.append(device_summary(ranker, hist, 10))
            edit = random_edit(ranker.model.head, rank=8, scale=0.01, generator=gen)
            out.edits.append(encode_payload(edit.to_flat(), dtype="fp16"))
        return out


async def _bench_recommend(args: argparse.Namespace, work: _BenchData, device: Any) -> list[dict]:
    from recsys.rpc.device.v1 import recommendation_pb2 as pb
    from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
    from recsys.serving.loadgen import run_load
    from recsys.serving.server import client_channel

    async with client_channel(device.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        if not args.no_edits:
            for user, payload in zip(work.users, work.edits, strict=True):
                await stub.ApplyEdit(
                    pb.ApplyEditRequest(user_id=user, edit_payload=payload, source="bench"),
                    timeout=5,
                )
        requests = [pb.RecommendRequest(user_id=u, k=args.k) for u in work.users]

        async def call(n: int) -> Any:
            return await stub.Recommend(requests[n % len(requests)], timeout=5.0)

        for r in requests[:50]:  # warm the user-state cache path and the channel
            await stub.Recommend(r, timeout=10.0)
        results = []
        for rate in (None, args.rate):
            server0, client0 = device.cpu_seconds(), time.process_time()
            res = await run_load(
                call,
                concurrency=args.concurrency,
                duration_s=args.duration,
                rate=rate,
                warmup_s=args.warmup,
            )
            summary = res.summary()
            calls = max(summary["requests"] + summary["errors"], 1) * (
                1 + args.warmup / args.duration
            )  # the warm-up calls used CPU too
            if server0 is not None:
                summary["server_cpu_ms_per_call"] = (device.cpu_seconds() - server0) * 1000 / calls
            summary["client_cpu_ms_per_call"] = (time.process_time() - client0) * 1000 / calls
            logger.info("recommend %s: %s", summary["mode"], summary)
            results.append(summary)
        return results


def _bench_edits(args: argparse.Namespace, work: _BenchData, loc: list[str]) -> list[dict]:
    """GenerateEdit with micro-batching on, then off (a fresh cloud process each)."""
    from recsys.serving.process import ServerProcess

    root = _artifacts(args)
    adaptor = root / "adaptor" / "adaptor.pt"
    engine = args.edit_engine
    if engine == "auto":
        engine = "artifacts" if adaptor.is_file() else "tiny"
    results = []
    with tempfile.TemporaryDirectory(prefix="recsys-bench-") as tmp:
        for label, max_batch, wait_ms in (("on", 32, 5.0), ("off", 1, 0.0)):
            argv = ["serve", "cloud", "--engine", engine, "--dataset", args.dataset,
                    "--batch-max", str(max_batch), "--batch-wait-ms", str(wait_ms),
                    "--torch-threads", str(args.torch_threads), *loc]  # fmt: skip
            store = Path(tmp) / f"store-{label}.sqlite"
            if engine == "tiny":
                spec = ",".join(f"{n}={o}x{i}" for n, (o, i) in work.spec.items())
                argv += ["--head-spec", spec, "--store-url", f"sqlite:///{store}"]
            else:  # a copy of the trained store: the benchmark must not write into it
                src = adaptor.parent / "prototypes.sqlite"
                if src.is_file():
                    shutil.copy(src, store)
                    argv += ["--store-url", f"sqlite:///{store}"]
            with ServerProcess(argv, name=f"cloud-{label}") as cloud:
                cloud.wait_ready(timeout=600)
                summary = asyncio.run(_drive_edits(args, work, cloud.target))
            summary.update(batching=label, max_batch=max_batch, wait_ms=wait_ms, engine=engine)
            logger.info("generate_edit %s: %s", label, summary)
            results.append(summary)
    return results


async def _drive_edits(args: argparse.Namespace, work: _BenchData, target: str) -> dict:
    from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
    from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
    from recsys.serving.loadgen import run_load
    from recsys.serving.server import client_channel

    requests = [
        cpb.GenerateEditRequest(
            device_id=u,
            recent_item_ids=items,
            summary=summary,
            payload_dtype=cpb.PAYLOAD_DTYPE_FP16,
        )
        for u, items, summary in zip(work.users, work.recent, work.summaries, strict=True)
    ]
    sizes: list[int] = []
    up: list[int] = []
    down: list[int] = []
    async with client_channel(target) as channel:
        stub = cpb_grpc.AdaptationServiceStub(channel)

        async def call(n: int) -> Any:
            req = requests[n % len(requests)]
            reply = await stub.GenerateEdit(req, timeout=30.0)
            up.append(req.ByteSize())
            return reply

        def seen(reply: Any) -> None:
            sizes.append(reply.batch_size)
            down.append(reply.ByteSize())

        await stub.GenerateEdit(requests[0], timeout=60.0)  # warm the engine
        res = await run_load(
            call,
            concurrency=args.concurrency,
            duration_s=args.edit_duration,
            warmup_s=args.warmup,
            on_result=seen,
        )
    summary = res.summary()
    summary["mean_batch"] = sum(sizes) / len(sizes) if sizes else 0.0
    summary["mean_bytes_up"] = sum(up) / len(up) if up else 0.0
    summary["mean_bytes_down"] = sum(down) / len(down) if down else 0.0
    return summary
