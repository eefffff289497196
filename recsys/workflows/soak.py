"""A bounded soak of both gRPC services over loopback (``recsys bench soak``).

:func:`run_soak` starts the cloud server and a device server linked to it as child
processes (:class:`recsys.serving.process.ServerProcess`, port 0, no state file unless
``state`` names one, optionally with a key made for the run and an operator token on
every call), then drives a mixed open-loop workload from this process for ``minutes``
(:func:`recsys.serving.loadgen.run_load`, one loop per RPC, all at once):

* **Recommend** at ``recommend_rate`` over the benchmark users (:class:`BenchData`);
* **RecordEvent** at ``event_rate``: every other event goes to a benchmark user, the
  others to a growing set of new users (``soak-0``, ``soak-1``, ... each with
  ``events_per_user`` events), so the device's ``max_users`` bound evicts and its
  request gate sends GenerateEdit calls to the cloud;
* **edits** at ``edit_rate``: the device's ``RequestEdit`` (waiting for the edit, so the
  device calls the cloud's GenerateEdit) or, with ``edit_via="cloud"``, GenerateEdit on
  the cloud directly.

Every ``interval_s`` it samples, per RPC, the calls that ended in the interval (answered,
errors by status code, p50 / p99 / max latency from the scheduled time), the resident
memory (VmRSS, /proc) and CPU of both server processes, and the device's ``GetStatus``
(users in memory, its GenerateEdit calls to the cloud and their failures). It prints a
row per interval as it goes, then the table and a summary.

**Pass criteria** (:func:`judge`): no RPC error (client calls, GetStatus samples and
the device's own GenerateEdit calls to the cloud), every server alive at the end, and
each server's RSS growth from the end of the first ``rss_baseline_s`` seconds to the end
of the run at most ``rss_growth_mb``.

Example::

    report = run_soak(SoakConfig(checkpoint="ranker-time.pt", adaptor="adaptor.pt",
                                 minutes=0.5, interval_s=5))
    report["passed"], report["summary"]["rss_growth_mb"]
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from recsys.reporting import format_table, print_table
from recsys.serving.process import ServerProcess
from recsys.validation import config_dataclass
from recsys.workflows.serve_bench import (
    BenchData,
    ServeBenchConfig,
    cloud_argv,
    edit_requests,
    resolve_engine,
)

logger = logging.getLogger(__name__)

MB = 1024 * 1024
TIMEOUTS_S = {"Recommend": 5.0, "RecordEvent": 5.0, "RequestEdit": 30.0, "GenerateEdit": 30.0}


@config_dataclass
class SoakConfig:
    """What ``recsys bench soak`` runs.

    Attributes:
        checkpoint / adaptor / dataset / data_dir / cache_dir / edit_engine /
            torch_threads / users / k: as for :class:`ServeBenchConfig` (the device's
            ranker, the cloud's engine, the benchmark users and their data).
        minutes: length of the measured run; interval_s: sampling period.
        concurrency: calls in flight at most, per RPC (open loop: a call waiting for a
            slot counts the wait in its latency).
        recommend_rate / event_rate / edit_rate: calls per second of each RPC (0: off).
        edit_via: "device" (RequestEdit on the device, which calls the cloud) or "cloud"
            (GenerateEdit on the cloud).
        events_per_user: events each new soak user gets (half the events go to new users).
        max_users: the device's in-memory user bound (``--max-users``).
        cloud_deadline: the device's GenerateEdit deadline, s.
        state: a device state file (None: memory only, as any ephemeral server).
        auth: servers check an operator token on every call (a key made for the run).
        rss_growth_mb / rss_baseline_s: the bound on each server's RSS growth, MB, from
            the sample due at or before ``rss_baseline_s`` (the first sample when none)
            to the last sample.
        seed: the RecordEvent items' random seed.
    """

    checkpoint: str
    adaptor: str
    dataset: str = "ml-100k"
    data_dir: str | None = None
    cache_dir: str | None = None
    minutes: float = Field(10.0, gt=0)
    interval_s: float = Field(10.0, gt=0)
    concurrency: int = Field(32, ge=1)
    recommend_rate: float = Field(100.0, ge=0)
    event_rate: float = Field(50.0, ge=0)
    edit_rate: float = Field(2.0, ge=0)
    edit_via: Literal["device", "cloud"] = "device"
    events_per_user: int = Field(10, ge=1)
    users: int = Field(500, ge=1)
    k: int = Field(10, ge=1)
    max_users: int = Field(1000, ge=1)
    cloud_deadline: float = Field(1.0, gt=0)
    edit_engine: Literal["auto", "artifacts", "tiny"] = "auto"
    torch_threads: int = Field(1, ge=1)
    state: str | None = None
    auth: bool = False
    rss_growth_mb: float = Field(50.0, ge=0)
    rss_baseline_s: float = Field(60.0, ge=0)
    seed: int = 0

    def bench_config(self) -> ServeBenchConfig:
        """The serve benchmark's config for the shared pieces (data, cloud argv)."""
        return ServeBenchConfig(
            checkpoint=self.checkpoint, adaptor=self.adaptor, dataset=self.dataset,
            data_dir=self.data_dir, cache_dir=self.cache_dir, users=self.users, k=self.k,
            edit_engine=self.edit_engine, torch_threads=self.torch_threads,
            concurrency=self.concurrency, auth=self.auth,
        )  # fmt: skip


@dataclass
class Bins:
    """The calls of one RPC that ended in the current interval."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, latency_ms: float | None, code: str | None) -> None:
        if code is None:
            self.latencies_ms.append(float(latency_ms or 0.0))
        else:
            self.errors[code] = self.errors.get(code, 0) + 1

    def take(self) -> dict[str, Any]:
        """This interval's figures; the bins start empty again."""
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (float("nan"),) * 2
        out = {
            "requests": len(lat),
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
            "p50_ms": float(p50),
            "p99_ms": float(p99),
            "max_ms": float(lat.max()) if len(lat) else float("nan"),
        }
        self.latencies_ms, self.errors = [], {}
        return out


def rss_mb(pid: int | None) -> float:
    """Resident memory of process ``pid`` (VmRSS from /proc), MB; NaN when unreadable."""
    if pid is None:
        return float("nan")
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def judge(summary: dict[str, Any], cfg: SoakConfig) -> list[str]:
    """Why the soak fails (empty: it passes): errors, a dead server, RSS growth over the
    bound, or no RSS sample."""
    failures = []
    if summary["errors"]:
        failures.append(f"{summary['errors']} errors ({summary['error_codes']})")
    for name, alive in summary["alive"].items():
        if not alive:
            failures.append(f"the {name} server died")
    for name, growth in summary["rss_growth_mb"].items():
        if growth is None or not np.isfinite(growth):
            failures.append(f"no RSS sample of the {name} server")
        elif growth > cfg.rss_growth_mb:
            failures.append(
                f"{name} RSS grew {growth:.1f} MB after the first {cfg.rss_baseline_s:.0f} s "
                f"(bound {cfg.rss_growth_mb:.0f} MB)"
            )
    return failures


def summarize(
    cfg: SoakConfig, intervals: list[dict[str, Any]], totals: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Totals, errors and RSS growth of a run (from its interval samples and the load
    generator's totals per RPC)."""
    errors: dict[str, int] = {}
    for rpc, tot in totals.items():
        for code, n in tot["error_codes"].items():
            errors[f"{rpc}:{code}"] = errors.get(f"{rpc}:{code}", 0) + n
    for row in intervals:
        for code, n in row["rpcs"].get("GetStatus", {}).get("error_codes", {}).items():
            errors[f"GetStatus:{code}"] = errors.get(f"GetStatus:{code}", 0) + n
    cloud_failures = sum(row.get("device_edit_failures", 0) for row in intervals)
    if cloud_failures:
        errors["device->cloud GenerateEdit:FAILED"] = cloud_failures
    growth: dict[str, float | None] = {}
    rss: dict[str, dict[str, float | None]] = {}
    for name in ("device", "cloud"):
        samples = [(r.get("tick_s", r["t_s"]), r[f"{name}_rss_mb"]) for r in intervals]
        samples = [(t, v) for t, v in samples if v is not None and np.isfinite(v)]
        if not samples:
            growth[name] = None
            rss[name] = {"baseline_mb": None, "end_mb": None, "max_mb": None}
            continue
        early = [(t, v) for t, v in samples if t <= cfg.rss_baseline_s + 1e-6]
        base_t, baseline = early[-1] if early else samples[0]
        end = samples[-1][1]
        growth[name] = end - baseline
        rss[name] = {"baseline_mb": baseline, "baseline_t_s": base_t, "end_mb": end,
                     "max_mb": max(v for _, v in samples), "first_mb": samples[0][1]}  # fmt: skip
    return {
        "requests": {rpc: tot["requests"] for rpc, tot in totals.items()},
        "errors": sum(errors.values()),
        "error_codes": errors,
        "p50_ms": {rpc: tot["p50_ms"] for rpc, tot in totals.items()},
        "p99_ms": {rpc: tot["p99_ms"] for rpc, tot in totals.items()},
        "max_ms": {rpc: tot["max_ms"] for rpc, tot in totals.items()},
        "throughput_rps": {rpc: tot["throughput_rps"] for rpc, tot in totals.items()},
        "device_edit_requests": sum(r.get("device_edit_requests", 0) for r in intervals),
        "device_edit_failures": cloud_failures,
        "rss": rss,
        "rss_growth_mb": growth,
        "rss_growth_bound_mb": cfg.rss_growth_mb,
        "rss_baseline_s": cfg.rss_baseline_s,
        "intervals": len(intervals),
    }


def _fmt(value: float | None, decimals: int) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.{decimals}f}"


def interval_rows(intervals: list[dict[str, Any]], rpcs: list[str]) -> list[dict[str, Any]]:
    """The printed columns: per RPC calls, errors, p50 and p99; RSS and users."""
    short = {"Recommend": "rec", "RecordEvent": "event", "RequestEdit": "edit",
             "GenerateEdit": "edit"}  # fmt: skip
    rows = []
    for r in intervals:
        row: dict[str, Any] = {"t_s": round(r.get("tick_s", r["t_s"]))}
        for rpc in rpcs:
            x, s = r["rpcs"].get(rpc, {}), short.get(rpc, rpc)
            row[f"{s}_n"] = x.get("requests", 0)
            row[f"{s}_err"] = x.get("errors", 0)
            row[f"{s}_p50"] = _fmt(x.get("p50_ms"), 2)
            row[f"{s}_p99"] = _fmt(x.get("p99_ms"), 2)
        row["cloud_edits"] = r.get("device_edit_requests", 0)
        row["cloud_fail"] = r.get("device_edit_failures", 0)
        row["users"] = r.get("users_in_memory", -1)
        row["dev_rss_mb"] = _fmt(r["device_rss_mb"], 1)
        row["cloud_rss_mb"] = _fmt(r["cloud_rss_mb"], 1)
        row["dev_cpu_%"] = _fmt(r.get("device_cpu_pct"), 0)
        row["cloud_cpu_%"] = _fmt(r.get("cloud_cpu_pct"), 0)
        rows.append(row)
    return rows


class Soak:
    """One run: the servers, the workload and the sampler (see the module docstring)."""

    def __init__(self, cfg: SoakConfig, work: BenchData, device: ServerProcess,
                 cloud: ServerProcess) -> None:  # fmt: skip
        self.cfg, self.work, self.device, self.cloud = cfg, work, device, cloud
        self.edit_rpc = "RequestEdit" if cfg.edit_via == "device" else "GenerateEdit"
        self.rates = {"Recommend": cfg.recommend_rate, "RecordEvent": cfg.event_rate,
                      self.edit_rpc: cfg.edit_rate}  # fmt: skip
        self.rpcs = [rpc for rpc, rate in self.rates.items() if rate > 0]
        self.bins = {rpc: Bins() for rpc in [*self.rpcs, "GetStatus"]}
        self.items = sorted({i for recent in work.recent for i in recent})
        self.rng = random.Random(cfg.seed)
        self.intervals: list[dict[str, Any]] = []
        self.outcomes: dict[str, int] = {}
        self.rss_start: dict[str, float] = {}

    async def run(self) -> dict[str, dict[str, Any]]:
        from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
        from recsys.rpc.device.v1 import recommendation_pb2 as pb
        from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
        from recsys.serving.loadgen import run_load
        from recsys.serving.server import client_channel

        cfg, work, md = self.cfg, self.work, self.work.metadata
        async with (
            client_channel(self.device.target) as dch,
            client_channel(self.cloud.target) as cch,
        ):
            dev = pb_grpc.RecommendationServiceStub(dch)
            cloud = cpb_grpc.AdaptationServiceStub(cch)
            users, n_users = work.users, len(work.users)
            recs = [pb.RecommendRequest(user_id=u, k=cfg.k) for u in users]
            gen = edit_requests(work)
            t_event = int(time.time())

            def event(n: int) -> Any:
                half, new = divmod(n, 2)
                user = f"soak-{half // cfg.events_per_user}" if new else users[half % n_users]
                item = self.items[self.rng.randrange(len(self.items))]
                return pb.RecordEventRequest(user_id=user, item_id=item, timestamp=t_event + n)

            async def edit(n: int) -> Any:
                if cfg.edit_via == "cloud":
                    return await cloud.GenerateEdit(gen[n % n_users], timeout=30.0, metadata=md)
                req = pb.RequestEditRequest(user_id=users[n % n_users], wait_for_edit=True)
                reply = await dev.RequestEdit(req, timeout=30.0, metadata=md)
                name = pb.EditOutcome.Name(reply.outcome)
                self.outcomes[name] = self.outcomes.get(name, 0) + 1
                return reply

            calls: dict[str, Callable[[int], Awaitable[Any]]] = {
                "Recommend": lambda n: dev.Recommend(recs[n % n_users], timeout=5.0, metadata=md),
                "RecordEvent": lambda n: dev.RecordEvent(event(n), timeout=5.0, metadata=md),
                self.edit_rpc: edit,
            }
            # warm-up (not counted): every benchmark user gets an event (so it is held in
            # memory even if seeding evicted it) and a ranking; one edit
            for i, user in enumerate(users):
                item = self.items[i % len(self.items)]
                await dev.RecordEvent(pb.RecordEventRequest(user_id=user, item_id=item,
                                      timestamp=t_event - 1), timeout=10.0, metadata=md)  # fmt: skip
                await dev.Recommend(recs[i], timeout=10.0, metadata=md)
            if cfg.edit_rate > 0:
                await calls[self.edit_rpc](0)
            self.outcomes.clear()
            status0 = await dev.GetStatus(pb.GetStatusRequest(), timeout=10.0, metadata=md)
            self.last_status = (status0.edit_requests, status0.edit_failures)
            duration = cfg.minutes * 60.0
            self.t0 = time.perf_counter()
            self.cpu0 = {"device": self.device.cpu_seconds(), "cloud": self.cloud.cpu_seconds()}
            self.rss_start = {name: rss_mb(proc.proc.pid if proc.proc else None)
                              for name, proc in (("device", self.device), ("cloud", self.cloud))}  # fmt: skip
            loads = [
                run_load(calls[rpc], concurrency=cfg.concurrency, duration_s=duration,
                         rate=self.rates[rpc], warmup_s=0.0, on_call=self.bins[rpc].add)
                for rpc in self.rpcs
            ]  # fmt: skip
            sampler = asyncio.create_task(self.sample_every(dev, pb, duration))
            results = await asyncio.gather(*loads)
            await sampler  # its ticks are all before the end of the run
            await self.sample(dev, pb, duration)  # the last one, once every call has ended
        return {rpc: res.summary() for rpc, res in zip(self.rpcs, results, strict=True)}

    async def sample_every(self, dev: Any, pb: Any, duration: float) -> None:
        k = 1
        while k * self.cfg.interval_s < duration - 1e-6:  # the last row: after the run
            delay = self.t0 + k * self.cfg.interval_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.sample(dev, pb, k * self.cfg.interval_s)
            k += 1

    async def sample(self, dev: Any, pb: Any, tick_s: float) -> None:
        """One interval's row (printed at once): ``tick_s`` is its nominal end, ``t_s``
        when it was taken."""
        t = time.perf_counter() - self.t0
        row: dict[str, Any] = {"t_s": t, "tick_s": tick_s, "rpcs": {}}
        for rpc in self.rpcs:
            row["rpcs"][rpc] = self.bins[rpc].take()
        t_status = time.perf_counter()
        try:
            st = await dev.GetStatus(
                pb.GetStatusRequest(), timeout=5.0, metadata=self.work.metadata
            )
        except Exception as exc:  # grpc.aio.AioRpcError: counted like any RPC error
            code = getattr(exc, "code", lambda: None)()
            self.bins["GetStatus"].add(None, code.name if code else type(exc).__name__)
        else:
            self.bins["GetStatus"].add((time.perf_counter() - t_status) * 1000, None)
            row["users_in_memory"] = st.num_users
            row["users_with_edit"] = st.users_with_edit
            requests, failures = st.edit_requests, st.edit_failures
            row["device_edit_requests"] = requests - self.last_status[0]
            row["device_edit_failures"] = failures - self.last_status[1]
            self.last_status = (requests, failures)
        row["rpcs"]["GetStatus"] = self.bins["GetStatus"].take()
        row["edit_outcomes"], self.outcomes = dict(self.outcomes), {}
        dt = t - (self.intervals[-1]["t_s"] if self.intervals else 0.0)
        for name, proc in (("device", self.device), ("cloud", self.cloud)):
            row[f"{name}_rss_mb"] = rss_mb(proc.proc.pid if proc.alive() else None)
            cpu = proc.cpu_seconds()
            prev = self.cpu0.get(name)
            row[f"{name}_cpu_pct"] = (
                100 * (cpu - prev) / dt if cpu is not None and prev is not None and dt > 0
                else float("nan")
            )  # fmt: skip
            self.cpu0[name] = cpu
        self.intervals.append(row)
        table = format_table(interval_rows([row], self.rpcs)).splitlines()
        if len(self.intervals) == 1:
            print("\n".join(table[:2]))
        print(table[2], flush=True)


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Run the soak (see the module docstring); the report (``passed``, ``failures``,
    ``summary``, ``intervals``, the config, dataset and load average)."""
    from recsys.data.registry import load_dataset
    from recsys.reporting import dataset_record

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    bench = cfg.bench_config()
    work = BenchData.load(bench)
    ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
    engine = resolve_engine(bench)
    with tempfile.TemporaryDirectory(prefix="recsys-soak-") as tmp:
        tmp_dir = Path(tmp)
        device_auth: list[str] = []
        if cfg.auth:
            (tmp_dir / "keys").mkdir()
            work.use_auth(tmp_dir / "keys")
            token = tmp_dir / "operator.token"
            token.write_text(dict(work.metadata)["authorization"].split(" ", 1)[1])
            device_auth = ["--cloud-token-file", str(token)]
        cloud = ServerProcess(cloud_argv(bench, work, engine, tmp_dir / "store.sqlite"),
                              name="cloud")  # fmt: skip
        with cloud:
            cloud.wait_ready(timeout=600)
            state = ["--state", cfg.state] if cfg.state else ["--no-state"]
            device = ServerProcess(
                ["serve", "device", "--checkpoint", cfg.checkpoint, "--dataset", cfg.dataset,
                 "--torch-threads", str(cfg.torch_threads), "--cloud", cloud.target,
                 "--cloud-deadline", str(cfg.cloud_deadline), "--max-users", str(cfg.max_users),
                 *state, *bench.location_args(), *work.auth_args, *device_auth],
                name="device",
            )  # fmt: skip
            with device:
                device.wait_ready(timeout=300)
                gc.collect()
                gc.freeze()  # the load generator's own heap stays out of GC passes
                soak = Soak(cfg, work, device, cloud)
                print(
                    f"\nSoak over loopback: {cfg.minutes:g} min, sampled every "
                    f"{cfg.interval_s:g} s; open loop: Recommend {cfg.recommend_rate:g}/s, "
                    f"RecordEvent {cfg.event_rate:g}/s (half to new users, "
                    f"{cfg.events_per_user} events each; device --max-users {cfg.max_users}), "
                    f"{soak.edit_rpc} {cfg.edit_rate:g}/s; {cfg.concurrency} in flight per RPC; "
                    f"cloud engine {engine}; latencies in ms; RSS in MB",
                    flush=True,
                )
                totals = asyncio.run(soak.run())
                alive = {"device": device.alive(), "cloud": cloud.alive()}
    summary = summarize(cfg, soak.intervals, totals)
    summary["alive"] = alive
    summary["rss_at_start_mb"] = soak.rss_start  # after the warm-up, before the load
    summary["edit_outcomes"] = {}
    for row in soak.intervals:
        for name, n in row["edit_outcomes"].items():
            summary["edit_outcomes"][name] = summary["edit_outcomes"].get(name, 0) + n
    failures = judge(summary, cfg)
    report = {
        "config": dataclasses.asdict(cfg),
        "dataset": dataset_record(ds, sizes=True),
        "engine": engine,
        "rpcs": soak.rpcs,
        "intervals": soak.intervals,
        "totals": totals,
        "summary": summary,
        "passed": not failures,
        "failures": failures,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    print_report(report)
    report["seconds"] = time.perf_counter() - t_start
    print(f"(soak {report['seconds']:.0f} s in all; load average before: "
          f"{', '.join(f'{x:.1f}' for x in load_before)}, after: "
          f"{', '.join(f'{x:.1f}' for x in report['load_average_after'])} "
          f"on {os.cpu_count()} cores)")  # fmt: skip
    return report


def print_report(report: dict[str, Any]) -> None:
    """The interval table, the totals per RPC and the verdict."""
    s, cfg = report["summary"], report["config"]
    print_table(interval_rows(report["intervals"], report["rpcs"]), title="Per interval")
    rows = [
        {"rpc": rpc, "requests": t["requests"], "errors": t["errors"],
         "throughput_rps": t["throughput_rps"], "p50_ms": t["p50_ms"], "p99_ms": t["p99_ms"],
         "max_ms": t["max_ms"]}
        for rpc, t in report["totals"].items()
    ]  # fmt: skip
    print_table(rows, title="Totals")
    print(
        f"device -> cloud GenerateEdit calls: {s['device_edit_requests']:,} "
        f"({s['device_edit_failures']:,} failed); RequestEdit outcomes: {s['edit_outcomes']}"
    )
    for name in ("device", "cloud"):
        r, g = s["rss"][name], s["rss_growth_mb"][name]
        if g is None:
            print(f"{name} RSS: not sampled")
            continue
        start = s.get("rss_at_start_mb", {}).get(name, float("nan"))
        print(f"{name} RSS: {start:.1f} MB before the load, {r['baseline_mb']:.1f} MB at "
              f"{r['baseline_t_s']:.0f} s (baseline), {r['end_mb']:.1f} MB at the end (max "
              f"{r['max_mb']:.1f}): growth {g:+.1f} MB (bound {cfg['rss_growth_mb']:.0f} MB)")  # fmt: skip
    print(f"errors: {s['errors']} {s['error_codes'] or ''}".rstrip())
    print("soak: PASSED" if report["passed"] else "soak: FAILED: " + "; ".join(report["failures"]))


def plot_soak(report: dict[str, Any], path: str | Path) -> None:
    """p99 per RPC (top) and each server's RSS (bottom) over time, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["intervals"]
    t = [r["t_s"] / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for rpc in report["rpcs"]:
        ax1.plot(t, [r["rpcs"][rpc]["p99_ms"] for r in rows], marker=".", label=f"{rpc} p99")
    ax1.set_yscale("log")
    ax1.set_ylabel("p99 latency per interval, ms")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    cfg, s = report["config"], report["summary"]
    for name in ("device", "cloud"):
        line = ax2.plot(t, [r[f"{name}_rss_mb"] for r in rows], marker=".", label=f"{name} RSS")
        base, base_t = s["rss"][name]["baseline_mb"], s["rss"][name].get("baseline_t_s")
        if base is not None and t:
            ax2.hlines(base + cfg["rss_growth_mb"], base_t / 60, t[-1], colors=line[0].get_color(),
                       linestyles="--", lw=0.8,
                       label=f"{name} bound (baseline +{cfg['rss_growth_mb']:g} MB)")  # fmt: skip
    ax2.set_ylabel("RSS, MB")
    ax2.set_xlabel("minutes")
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    verdict = "passed" if report["passed"] else "FAILED"
    fig.suptitle(f"recsys bench soak: {report['dataset']['name']}, {cfg['minutes']:g} min, "
                 f"{s['errors']} errors, {verdict}")  # fmt: skip
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


__all__ = ["SoakConfig", "judge", "plot_soak", "run_soak", "summarize"]
