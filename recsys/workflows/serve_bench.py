"""The load benchmark of the gRPC services over loopback (``recsys bench serve``).

:func:`run_serve_bench` starts the device server as a child process
(:class:`recsys.serving.process.ServerProcess`), gives every benchmark user an edit
(ApplyEdit, unless ``with_edits`` is off) and drives Recommend from this process with
``grpc.aio`` clients (:func:`recsys.serving.loadgen.run_load`): a closed loop (highest
throughput at ``concurrency`` in flight), then an open loop at ``rate`` (latency at that
load, coordinated omission counted). Then GenerateEdit against a fresh cloud server with
micro-batching on (32 calls, 5 ms) and off. It prints a table per part and returns every
figure (the ``--json`` report).

The requests come from the dataset's time split (training period): users with 5+
events, their last 50 item ids, their device summary
(:func:`device_ranker.service.cloud_edits.device_summary`) and a random rank-8 edit
each.

Example::

    report = run_serve_bench(ServeBenchConfig(checkpoint="ranker-time.pt",
                                              adaptor="artifacts/ml-100k/adaptor/adaptor.pt",
                                              duration=5, skip_edits=True))
    report["recommend"][-1]["p99_ms"], report["goal_met"]
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from recsys.reporting import print_table
from recsys.serving.process import ServerProcess
from recsys.validation import config_dataclass

logger = logging.getLogger(__name__)

MIN_EVENTS = 5  # users with fewer training events are not benchmark users
UPLINK_ITEMS = 50  # item ids a GenerateEdit request carries (the device's default)
SUMMARY_ITEMS = 10  # items pooled into the summary (the device's default)
GOAL_RPS, GOAL_P99_MS, GOAL_CONCURRENCY = 1000, 20, 32  # the serving target


@config_dataclass
class ServeBenchConfig:
    """What ``recsys bench serve`` measures.

    Attributes:
        checkpoint: the ranker checkpoint the device server loads.
        adaptor: the trained adaptor artefact; ``edit_engine="auto"`` uses the
            "artifacts" cloud engine when it exists, else "tiny".
        dataset / data_dir / cache_dir: the dataset (users, histories) and where it is.
        concurrency: calls in flight; duration / warmup: measured / uncounted seconds per
            Recommend phase; rate: the open-loop Recommend rate, 1/s; k: Recommend's k.
        users: benchmark users the requests cycle over (at most).
        with_edits: every user has an edit (False: the base model ranks).
        edit_engine / edit_duration / skip_edits: the GenerateEdit phases.
        edit_concurrency: GenerateEdit calls in flight (None: ``concurrency``); a cloud
            with a 135M LLM answers in about a second, so fewer in flight keep the
            latency inside the client's deadline.
        skip_recommend: skip the Recommend phases (GenerateEdit only).
        torch_threads: torch intra-op threads in the servers.
        auth: run the servers with authentication (a key made for the run, in a temporary
            directory) and send an operator token with every call, to measure its cost.
    """

    checkpoint: str
    adaptor: str
    dataset: str = "ml-100k"
    data_dir: str | None = None
    cache_dir: str | None = None
    concurrency: int = Field(32, ge=1)
    duration: float = Field(10.0, gt=0)
    warmup: float = Field(2.0, ge=0)
    rate: float = Field(1000.0, gt=0)
    k: int = Field(10, ge=1)
    users: int = Field(500, ge=1)
    with_edits: bool = True
    edit_engine: Literal["auto", "artifacts", "tiny"] = "auto"
    edit_duration: float = Field(8.0, gt=0)
    skip_edits: bool = False
    edit_concurrency: int | None = Field(None, ge=1)
    skip_recommend: bool = False
    torch_threads: int = Field(1, ge=1)
    auth: bool = False

    def location_args(self) -> list[str]:
        """``--data-dir`` / ``--cache-dir`` for the child servers."""
        loc = []
        if self.data_dir:
            loc += ["--data-dir", self.data_dir]
        if self.cache_dir:
            loc += ["--cache-dir", self.cache_dir]
        return loc


@dataclass
class BenchData:
    """Users, their uplink windows, summaries [2D] and edit payloads for the requests;
    with ``auth``, the servers' key directory and the clients' call metadata."""

    users: list[str] = field(default_factory=list)
    recent: list[list[str]] = field(default_factory=list)
    summaries: list[list[float]] = field(default_factory=list)
    edits: list[bytes] = field(default_factory=list)
    num_items: int = 0
    spec: dict[str, tuple[int, int]] = field(default_factory=dict)
    auth_args: list[str] = field(default_factory=list)
    metadata: tuple[tuple[str, str], ...] = ()

    def use_auth(self, directory: Path) -> None:
        """A key in ``directory`` for the servers, an operator token for the clients."""
        from recsys.serving.auth import issue_token, token_metadata
        from recsys.serving.keys import generate_key, write_key

        key = generate_key("bench")
        write_key(key, directory / "bench.key")
        self.auth_args = ["--auth-key", str(directory)]
        self.metadata = token_metadata(issue_token(key, "bench", role="operator", ttl_s=86400))

    @classmethod
    def load(cls, cfg: ServeBenchConfig) -> BenchData:
        import numpy as np
        import torch

        from device_ranker.edits import random_edit
        from device_ranker.ranker import Ranker
        from device_ranker.service.cloud_edits import device_summary
        from recsys.adaptor_inputs import uplink_window
        from recsys.data import time_split
        from recsys.data.registry import load_dataset
        from recsys.edit_payload import encode_payload

        torch.set_num_threads(1)
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
        ranker = Ranker.from_checkpoint(cfg.checkpoint)
        rows = np.sort(time_split(ds, quantile=0.8).train)
        users = ds.user_index[rows]
        seqs: dict[int, list[int]] = {}
        for u, i in zip(users.tolist(), ds.item_index[rows].tolist(), strict=True):
            seqs.setdefault(u, []).append(i)
        order = [u for u in sorted(seqs) if len(seqs[u]) >= MIN_EVENTS][: cfg.users]
        out = cls(num_items=ranker.num_items, spec=ranker.edit_spec())
        gen = torch.Generator().manual_seed(0)
        for u in order:  # U <= cfg.users benchmark users, prepared once
            hist = seqs[u]
            out.users.append(str(ds.user_ids[u]))
            out.recent.append([str(ds.item_ids[i]) for i in uplink_window(hist, UPLINK_ITEMS)])
            out.summaries.append(device_summary(ranker, hist, SUMMARY_ITEMS))
            edit = random_edit(ranker.model.head, rank=8, scale=0.01, generator=gen)
            out.edits.append(encode_payload(edit.to_flat(), dtype="fp16"))
        return out


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Run the benchmark (see the module docstring), print its tables; the report."""
    t0 = time.perf_counter()
    work = BenchData.load(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as keys:
        if cfg.auth:
            work.use_auth(Path(keys))
        report = _run(cfg, work)
    report["seconds"] = time.perf_counter() - t0
    print(f"(bench {report['seconds']:.0f} s; load average before: "
          f"{', '.join(f'{x:.1f}' for x in report['load_average'])} on {os.cpu_count()} cores)")  # fmt: skip
    return report


def _run(cfg: ServeBenchConfig, work: BenchData) -> dict[str, Any]:
    report: dict[str, Any] = {
        "dataset": cfg.dataset,
        "checkpoint": str(cfg.checkpoint),
        "num_items": work.num_items,
        "concurrency": cfg.concurrency,
        "rate": cfg.rate,
        "k": cfg.k,
        "users": len(work.users),
        "with_edits": cfg.with_edits,
        "auth": cfg.auth,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    if not cfg.skip_recommend:
        bench_recommend_phases(cfg, work, report)
    if not cfg.skip_edits:
        report["generate_edit"] = bench_edits(cfg, work)
        engine = report["generate_edit"][0]["engine"] if report["generate_edit"] else "?"
        print_table(
            edit_rows(report["generate_edit"]),
            title=f"GenerateEdit over loopback: engine {engine} ({cfg.adaptor}), closed loop "
            f"at {cfg.edit_concurrency or cfg.concurrency} in flight, "
            f"{cfg.edit_duration:.0f} s per phase, cloud server {cfg.torch_threads} torch "
            "thread(s); cloud_cpu_ms = the cloud process's CPU time per answered call",
        )
        on, off = report["generate_edit"]
        if off["throughput_rps"]:
            report["batching_speedup"] = on["throughput_rps"] / off["throughput_rps"]
            print(f"micro-batching speed-up: x{report['batching_speedup']:.2f} throughput")
    return report


def bench_recommend_phases(cfg: ServeBenchConfig, work: BenchData, report: dict[str, Any]) -> None:
    """The Recommend phases against a device server child process, their table and the
    serving goal (into ``report``)."""
    device = ServerProcess(
        ["serve", "device", "--checkpoint", str(cfg.checkpoint), "--dataset", cfg.dataset,
         "--torch-threads", str(cfg.torch_threads), *cfg.location_args(), *work.auth_args],
        name="device",
    )  # fmt: skip
    gc.collect()
    gc.freeze()  # the load generator's own heap (dataset, ranker) stays out of GC passes
    with device:
        device.wait_ready(timeout=300)
        report["recommend"] = asyncio.run(bench_recommend(cfg, work, device))
    print_table(
        recommend_rows(report["recommend"]),
        title=f"Recommend over loopback: {work.num_items} items (full catalogue), k={cfg.k}, "
        f"{len(work.users)} users, {'per-user edits' if cfg.with_edits else 'base model'}, "
        f"{'operator token checked on every call, ' if cfg.auth else ''}"
        f"device server in a child process ({cfg.torch_threads} torch thread), "
        f"client: grpc.aio in this process, {cfg.duration:.0f} s per phase",
    )
    open_loop = report["recommend"][-1]
    met = (
        open_loop["throughput_rps"] >= GOAL_RPS
        and open_loop["p99_ms"] < GOAL_P99_MS
        and open_loop["errors"] == 0
        and cfg.concurrency >= GOAL_CONCURRENCY
    )
    report["goal_met"] = met
    print(
        f"goal (>= 1,000 req/s with p99 < 20 ms at 32 concurrent clients): "
        f"{'met' if met else 'NOT met'} ({open_loop['throughput_rps']:,.0f} req/s, "
        f"p99 {open_loop['p99_ms']:.2f} ms at {cfg.concurrency} in flight)"
    )


def recommend_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The printed columns of the Recommend phases."""
    return [
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
        for r in results
    ]


def edit_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The printed columns of the GenerateEdit phases."""
    keys = ("batching", "max_batch", "wait_ms", "requests", "errors", "throughput_rps",
            "p50_ms", "p95_ms", "p99_ms", "mean_batch", "cloud_cpu_ms")  # fmt: skip
    return [{k: r.get(k, float("nan")) for k in keys} for r in results]


async def bench_recommend(
    cfg: ServeBenchConfig, work: BenchData, device: ServerProcess
) -> list[dict[str, Any]]:
    """The closed-loop, then the open-loop Recommend phase: a load summary each, with the
    server's and this process's CPU per call."""
    from recsys.rpc.device.v1 import recommendation_pb2 as pb
    from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
    from recsys.serving.loadgen import run_load
    from recsys.serving.server import client_channel

    async with client_channel(device.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        if cfg.with_edits:
            for user, payload in zip(work.users, work.edits, strict=True):
                await stub.ApplyEdit(
                    pb.ApplyEditRequest(user_id=user, edit_payload=payload, source="bench"),
                    timeout=5,
                    metadata=work.metadata,
                )
        requests = [pb.RecommendRequest(user_id=u, k=cfg.k) for u in work.users]

        async def call(n: int) -> Any:
            return await stub.Recommend(
                requests[n % len(requests)], timeout=5.0, metadata=work.metadata
            )

        for r in requests[:50]:  # warm the user-state cache path and the channel
            await stub.Recommend(r, timeout=10.0, metadata=work.metadata)
        results = []
        for rate in (None, cfg.rate):
            server0, client0 = device.cpu_seconds(), time.process_time()
            res = await run_load(
                call,
                concurrency=cfg.concurrency,
                duration_s=cfg.duration,
                rate=rate,
                warmup_s=cfg.warmup,
            )
            summary = res.summary()
            calls = max(summary["requests"] + summary["errors"], 1) * (
                1 + cfg.warmup / cfg.duration
            )  # the warm-up calls used CPU too
            if server0 is not None:
                summary["server_cpu_ms_per_call"] = (device.cpu_seconds() - server0) * 1000 / calls
            summary["client_cpu_ms_per_call"] = (time.process_time() - client0) * 1000 / calls
            logger.info("recommend %s: %s", summary["mode"], summary)
            results.append(summary)
        return results


def bench_edits(cfg: ServeBenchConfig, work: BenchData) -> list[dict[str, Any]]:
    """GenerateEdit with micro-batching on, then off (a fresh cloud process each)."""
    engine = resolve_engine(cfg)
    results = []
    with tempfile.TemporaryDirectory(prefix="recsys-bench-") as tmp:
        for label, max_batch, wait_ms in (("on", 32, 5.0), ("off", 1, 0.0)):
            argv = cloud_argv(cfg, work, engine, Path(tmp) / f"store-{label}.sqlite",
                              max_batch=max_batch, wait_ms=wait_ms)  # fmt: skip
            with ServerProcess(argv, name=f"cloud-{label}") as cloud:
                cloud.wait_ready(timeout=600)
                summary = asyncio.run(drive_edits(cfg, work, cloud.target, cloud.cpu_seconds))
            summary.update(batching=label, max_batch=max_batch, wait_ms=wait_ms, engine=engine)
            logger.info("generate_edit %s: %s", label, summary)
            results.append(summary)
    return results


def resolve_engine(cfg: ServeBenchConfig) -> str:
    """The cloud engine: ``edit_engine``, where "auto" is "artifacts" when the adaptor
    artefact exists, else "tiny"."""
    if cfg.edit_engine != "auto":
        return cfg.edit_engine
    return "artifacts" if Path(cfg.adaptor).is_file() else "tiny"


def cloud_argv(
    cfg: ServeBenchConfig,
    work: BenchData,
    engine: str,
    store: Path,
    *,
    max_batch: int = 32,
    wait_ms: float = 5.0,
) -> list[str]:
    """``recsys serve cloud ...`` for a benchmark cloud: ``engine`` ("tiny": a new SQLite
    store at ``store`` and the ranker's head spec; "artifacts": ``cfg.adaptor`` with a
    copy of its trained store at ``store``, so the benchmark never writes into it)."""
    from recsys.workflows.adaptor_training import default_store_path

    argv = ["serve", "cloud", "--engine", engine, "--dataset", cfg.dataset,
            "--batch-max", str(max_batch), "--batch-wait-ms", str(wait_ms),
            "--torch-threads", str(cfg.torch_threads), *cfg.location_args(),
            *work.auth_args]  # fmt: skip
    if engine == "tiny":
        spec = ",".join(f"{n}={o}x{i}" for n, (o, i) in work.spec.items())
        argv += ["--head-spec", spec, "--store-url", f"sqlite:///{store}"]
    else:  # a copy of the trained store: the benchmark must not write into it
        adaptor = Path(cfg.adaptor)
        argv += ["--adaptor", str(adaptor)]
        src = default_store_path(adaptor)
        if src.is_file():
            shutil.copy(src, store)
            argv += ["--store-url", f"sqlite:///{store}"]
    return argv


def edit_requests(work: BenchData) -> list[Any]:
    """One GenerateEditRequest per benchmark user (its uplink window and summary, fp16)."""
    from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb

    return [
        cpb.GenerateEditRequest(
            device_id=u,
            recent_item_ids=items,
            summary=summary,
            payload_dtype=cpb.PAYLOAD_DTYPE_FP16,
        )
        for u, items, summary in zip(work.users, work.recent, work.summaries, strict=True)
    ]


async def drive_edits(
    cfg: ServeBenchConfig,
    work: BenchData,
    target: str,
    cloud_cpu: Callable[[], float | None] = lambda: None,
) -> dict[str, Any]:
    """One closed-loop GenerateEdit phase against ``target``: the load summary plus the
    mean cloud batch, the mean request / response bytes and, when ``cloud_cpu`` reads
    the server's CPU seconds, its CPU milliseconds per answered call (every call after
    the warm-up call, the load generator's uncounted warm-up seconds included)."""
    from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
    from recsys.serving.loadgen import run_load
    from recsys.serving.server import client_channel

    requests = edit_requests(work)
    sizes: list[int] = []
    answered = [0]
    up: list[int] = []
    down: list[int] = []
    async with client_channel(target) as channel:
        stub = cpb_grpc.AdaptationServiceStub(channel)

        async def call(n: int) -> Any:
            req = requests[n % len(requests)]
            reply = await stub.GenerateEdit(req, timeout=30.0, metadata=work.metadata)
            answered[0] += 1
            up.append(req.ByteSize())
            return reply

        def seen(reply: Any) -> None:
            sizes.append(reply.batch_size)
            down.append(reply.ByteSize())

        await stub.GenerateEdit(requests[0], timeout=60.0, metadata=work.metadata)  # warm
        cpu0 = cloud_cpu()
        res = await run_load(
            call,
            concurrency=cfg.edit_concurrency or cfg.concurrency,
            duration_s=cfg.edit_duration,
            warmup_s=cfg.warmup,
            on_result=seen,
        )
    cpu1 = cloud_cpu()
    summary = res.summary()
    if cpu0 is not None and cpu1 is not None and answered[0]:
        summary["cloud_cpu_ms"] = (cpu1 - cpu0) * 1000 / answered[0]
    summary["mean_batch"] = sum(sizes) / len(sizes) if sizes else 0.0
    summary["mean_bytes_up"] = sum(up) / len(up) if up else 0.0
    summary["mean_bytes_down"] = sum(down) / len(down) if down else 0.0
    return summary


__all__ = ["BenchData", "ServeBenchConfig", "run_serve_bench"]
