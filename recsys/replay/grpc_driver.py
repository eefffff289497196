"""The replay through the real gRPC services (``recsys replay --via grpc``).

Same protocol, stream, gate thresholds and metrics as the in-process engine
(:func:`recsys.replay.engine.run_replay`), but every decision and every score comes from
the deployed servers, started here as child processes on loopback ports
(:class:`recsys.serving.process.ServerProcess`):

* **cloud** (``recsys serve cloud --engine artifacts``): the adaptor artefact's LM (or
  recent-item) tokens, adaptor and prototypes, on a copy of the artefact whose prototype
  bank is frozen (never refined, never spawned: the in-process replay's bank is frozen at
  the artefact's version 1) and a copy of its store; micro-batching off, so an edit never
  depends on which other devices asked at the same moment;
* **device** (``recsys serve device``), one per policy: the time-split ranker with the
  artefact's edit bounds, every user seeded with its training-period history, the
  policy's trigger (``gate`` with the threshold calibrated once by
  :func:`recsys.replay.engine.prepare_replay`, or ``timer``), the same uplink (recent
  items, summary) and payload precision as the protocol; ranking one call at a time.

Per device (user), in time order: a device that already has ``min_history`` events asks
for its first edit before its first replay event (``RequestEdit``); then for each event
``Recommend`` ranks with the current edit and returns the target's rank (full catalogue,
history excluded, ties pessimistic) and the scores of the target and its sampled
negatives (``probe_item_ids``), and ``RecordEvent`` (``wait_for_edit``) appends the event;
the device's trigger may ask the cloud, synchronously, and the edit serves later events.
Users run concurrently (``concurrency``); a user's results depend only on its own events.

Policies: ``static`` and ``system`` (gate or timer). ``finetune`` and ``duet`` have no
deployed service (back-propagation on the device, a cloud without the LM) and are
rejected with a clear error.

Costs per policy are measured on the services: serialized GenerateEdit requests and
responses (the response also carries the generated item ids and tokens, for audit), the
device's time to decode, compose and materialise each edit (measured in the device
server), the cloud's engine time per edit, RPC round-trip latencies, and the device
server's CPU time per evaluated event (ranking included, from /proc).

Example::

    run = run_replay_grpc(ds, ReplayConfig(max_users=20), [PolicySpec("static"),
                          PolicySpec("system", "gate", 0.2)], cache=settings.cache_dir())
    run.records["system gate 20%"].summary()["ndcg@10"]
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.data import Dataset, write_dataset
from recsys.errors import RecsysError, ValidationError
from recsys.metrics import sampled_auc
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.costs import CostAccumulator
from recsys.replay.engine import ReplayRun, check_policies, prepare_replay, run_meta, run_replay
from recsys.replay.policies import trigger_key
from recsys.replay.records import EventRecords
from recsys.replay.stream import UserEvents
from recsys.serving.process import ServerProcess

logger = logging.getLogger(__name__)

GRPC_KINDS = ("static", "system")
RPC_TIMEOUT_S = 600.0  # an edit on a cold LM can take long; the replay waits for it
DEFAULT_CONCURRENCY = 4  # users replayed at once (each user's events stay in order)


@dataclass
class _UserOut:
    """One device's replay under one policy (E evaluated events, M negatives)."""

    user: int
    item: np.ndarray  # [E]
    timestamp: np.ndarray  # [E]
    rank: np.ndarray  # [E]
    pos_score: np.ndarray  # [E]
    neg_scores: np.ndarray  # [E, M]
    requested: np.ndarray  # [E]
    edits: list[Any] = field(default_factory=list)  # EditCost of each edit request
    failed: int = 0  # edit requests that failed
    recommend_ms: list[float] = field(default_factory=list)
    record_ms: list[float] = field(default_factory=list)


def check_grpc_policies(policies: Sequence[PolicySpec]) -> list[PolicySpec]:
    """The policies the deployed services can run (static, system); others: a clear error."""
    specs = check_policies(policies)
    bad = [s.label for s in specs if s.kind not in GRPC_KINDS]
    if bad:
        raise ValidationError(
            f"--via grpc runs the deployed services, which serve only {list(GRPC_KINDS)} "
            f"policies; {bad} have no service (on-device fine-tuning, the DUET baseline): "
            "replay them in process, or leave them out"
        )
    return specs


def frozen_artifact(art: dict[str, Any], dest: Path) -> Path:
    """Write a copy of the adaptor artefact whose prototype bank never changes.

    The cloud refines a prototype every ``refine_every`` member edits and spawns one when
    enough residuals are far; the in-process replay freezes the bank at the artefact's
    version, so the copy sets ``refine_every`` beyond reach and the spawn threshold to
    +inf. Everything else (weights, bounds, ranker, token source) is unchanged.
    """
    frozen = dict(art)
    cfg = dict(art["config"])
    cfg["prototypes"] = dict(cfg["prototypes"], refine_every=2**62)
    frozen["config"] = cfg
    frozen["prototypes"] = dict(art.get("prototypes", {}), spawn_threshold=math.inf)
    torch.save(frozen, dest)
    return dest


def _store_copy(art: dict[str, Any], tmp: Path) -> list[str]:
    """``--store-url`` of a private copy of the artefact's SQLite store (the edit log and
    assignments the replay writes stay out of it); other stores are used as they are."""
    url = str(art.get("store_url") or "")
    if url.startswith("sqlite:///"):
        src = Path(url.removeprefix("sqlite:///"))
        if src.is_file():
            dest = tmp / "prototypes.sqlite"
            shutil.copy(src, dest)
            return ["--store-url", f"sqlite:///{dest}"]
    return ["--store-url", url] if url else []


def cloud_argv(
    art: dict[str, Any], art_path: Path, cache: Path, dataset: str, tmp: Path
) -> list[str]:
    """``recsys serve cloud`` arguments for the replay (frozen bank, no micro-batching)."""
    from recsys.workflows.adaptor_training import config_from_dict

    tcfg = config_from_dict(art["config"])
    root = Path(cache) / "artifacts" / dataset
    frozen = frozen_artifact(art, tmp / art_path.name)
    return [
        "serve", "cloud", "--engine", "artifacts", "--adaptor", str(frozen),
        "--codebook-dir", str(root / "codebook"), "--lm-dir", str(root / "lm"),
        "--lm-backend", tcfg.lm_backend, *_store_copy(art, tmp),
        "--batch-max", "1", "--batch-wait-ms", "0", "--torch-threads", "1",
    ]  # fmt: skip


def device_argv(
    spec: PolicySpec | None,
    cfg: ReplayConfig,
    art: dict[str, Any],
    ds_dir: Path,
    thresholds: dict[float, float],
    cloud_target: str | None,
) -> list[str]:
    """``recsys serve device`` arguments reproducing the in-process device of ``spec``
    (None: a device whose arms come from an experiment, linked to the cloud)."""
    from recsys.workflows.adaptor_training import config_from_dict

    tcfg = config_from_dict(art["config"])
    bounds = art["bounds"]
    argv = [
        "serve", "device", "--checkpoint", str(art["ranker_path"]), "--dataset", str(ds_dir),
        "--seed-histories", "time", "--seed-quantile", repr(cfg.quantile),
        "--history-len", str(max(200, cfg.uplink_items, tcfg.windows.summary_items)),
        "--max-weight-norm", repr(float(bounds["device_max_weight_norm"])),
        "--max-bias-abs", repr(float(bounds["device_max_bias_abs"])),
        "--max-probes", str(max(1000, cfg.negatives + 1)),
        "--rank-batch", "1", "--rank-wait-ms", "0", "--torch-threads", "1",
        "--gate-window", str(cfg.gate_window), "--gate-min-history", str(cfg.min_history),
        "--gate-min-gap", str(cfg.gate_min_gap),
    ]  # fmt: skip
    key = trigger_key(spec) if spec is not None else ("arms", 0.0)
    if key is None:  # static: no cloud at all
        return argv
    kind, value = key
    if kind == "timer":  # period value: the device's timer asks every round(1 / budget)
        argv += ["--gate-trigger", "timer", "--gate-budget", repr(1.0 / value)]
    elif kind == "gate":
        argv += ["--gate-trigger", "gate", "--gate-budget", repr(value)]
        argv += ["--gate-threshold", repr(float(thresholds[value]))]
    if cloud_target is None:
        raise ValidationError("a device that requests edits needs the cloud's address")
    argv += [
        "--cloud", cloud_target, "--cloud-deadline", str(RPC_TIMEOUT_S),
        "--probe-interval", "2", "--payload-dtype", cfg.payload_dtype,
        "--recent-items", str(cfg.uplink_items),
        "--summary-items", str(tcfg.windows.summary_items),
    ]  # fmt: skip
    if not int(art["adaptor_config"].get("summary_dim", 0)):
        argv.append("--no-summary")
    return argv


async def _replay_user(
    stub: Any, pb: Any, ev: UserEvents, ds: Dataset, cfg: ReplayConfig, requests: bool
) -> _UserOut:
    """One device's events through the device server (see the module docstring)."""
    uid = str(ds.user_ids[ev.user])
    item_ids = ds.item_ids
    idx = np.flatnonzero(ev.evaluated)
    out = _UserOut(
        user=ev.user,
        item=ev.items[idx],
        timestamp=ev.timestamps[idx],
        rank=np.zeros(len(idx), dtype=np.int64),
        pos_score=np.zeros(len(idx), dtype=np.float64),
        neg_scores=np.zeros((len(idx), ev.negatives.shape[1]), dtype=np.float64),
        requested=np.zeros(len(idx), dtype=bool),
    )

    def note(reply: Any) -> None:
        if reply.outcome == pb.EDIT_OUTCOME_FAILED:
            out.failed += 1
        out.edits.append(reply.cost)

    if requests and len(ev.start) >= cfg.min_history:
        reply = await stub.RequestEdit(
            pb.RequestEditRequest(user_id=uid, wait_for_edit=True), timeout=RPC_TIMEOUT_S
        )
        note(reply)
    row = 0
    for n in range(len(ev.items)):
        if ev.evaluated[n]:
            probes = [str(item_ids[ev.items[n]])] + [str(item_ids[j]) for j in ev.negatives[n]]
            t0 = time.perf_counter()
            rec = await stub.Recommend(
                pb.RecommendRequest(user_id=uid, k=1, probe_item_ids=probes),
                timeout=RPC_TIMEOUT_S,
            )
            out.recommend_ms.append((time.perf_counter() - t0) * 1e3)
            out.rank[row] = rec.probe_ranks[0]
            out.pos_score[row] = rec.probe_scores[0]
            out.neg_scores[row] = rec.probe_scores[1:]
        t0 = time.perf_counter()
        reply = await stub.RecordEvent(
            pb.RecordEventRequest(
                user_id=uid,
                item_id=str(item_ids[ev.items[n]]),
                timestamp=int(ev.timestamps[n]),
                wait_for_edit=True,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        out.record_ms.append((time.perf_counter() - t0) * 1e3)
        if reply.edit_requested:
            note(reply)
        if ev.evaluated[n]:
            out.requested[row] = reply.edit_requested
            row += 1
    return out


async def _drive(
    target: str,
    events: list[UserEvents],
    ds: Dataset,
    cfg: ReplayConfig,
    spec: PolicySpec,
    concurrency: int,
    bar: Any,
) -> list[_UserOut]:
    """All devices of one policy, ``concurrency`` at a time; results in user order."""
    from recsys.rpc.device.v1 import recommendation_pb2 as pb
    from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
    from recsys.serving.server import client_channel

    sem = asyncio.Semaphore(concurrency)
    async with client_channel(target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)

        async def one(ev: UserEvents) -> _UserOut:
            async with sem:
                res = await _replay_user(stub, pb, ev, ds, cfg, spec.requests)
                bar.update(1)
                return res

        return list(await asyncio.gather(*(one(ev) for ev in events)))


def _records(parts: list[_UserOut]) -> EventRecords:
    """Merge the devices' events; AUC of each target against its negatives, vectorised."""
    if not parts:
        return EventRecords.empty()
    pos = np.concatenate([p.pos_score for p in parts])
    neg = np.concatenate([p.neg_scores for p in parts])
    auc = sampled_auc(torch.from_numpy(pos), torch.from_numpy(neg)).numpy() if len(pos) else pos
    return EventRecords(
        user=np.concatenate([np.full(len(p.item), p.user, dtype=np.int64) for p in parts]),
        item=np.concatenate([p.item for p in parts]),
        timestamp=np.concatenate([p.timestamp for p in parts]),
        rank=np.concatenate([p.rank for p in parts]),
        auc=auc,
        requested=np.concatenate([p.requested for p in parts]),
    ).sorted()


def _costs(parts: list[_UserOut], evaluated: int, device_cpu_s: float | None) -> dict[str, Any]:
    """Costs of one policy measured on the services, under the in-process engine's keys
    (:meth:`recsys.replay.costs.CostAccumulator.summary`), plus RPC latencies and the
    device server's CPU time. An edit's FLOPs and peak memory are not observable from
    outside the device: NaN."""
    acc = CostAccumulator()
    nan = float("nan")
    for p in parts:
        for e in p.edits:
            acc.add(
                decode_us=e.device_decode_us,
                apply_us=e.device_apply_us,
                device_flops=nan,
                device_peak_bytes=nan,
                uplink_bytes=e.bytes_up,
                downlink_bytes=e.bytes_down,
                payload_bytes=e.payload_bytes,
                cloud_ms=e.cloud_ms,
                initial=e is p.edits[0],
            )
            if e.prototype_bytes:
                acc.prototype_downloads += 1
                acc.prototype_bytes += e.prototype_bytes
    out: dict[str, Any] = acc.summary(evaluated)

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else nan

    rec = [x for p in parts for x in p.recommend_ms]
    ev = [x for p in parts for x in p.record_ms]
    out.update(
        failed_requests=int(sum(p.failed for p in parts)),
        recommend_ms_p50=pct(rec, 50),
        recommend_ms_p99=pct(rec, 99),
        record_event_ms_p50=pct(ev, 50),
        record_event_ms_p99=pct(ev, 99),
        device_server_cpu_s=device_cpu_s,
        device_server_cpu_us_per_event=nan
        if device_cpu_s is None
        else device_cpu_s * 1e6 / max(evaluated, 1),
    )
    return out


def run_replay_grpc(
    ds: Dataset,
    cfg: ReplayConfig,
    policies: Sequence[PolicySpec],
    *,
    cache: Path,
    users: Sequence[int] | None = None,
    progress: bool = True,
    concurrency: int = DEFAULT_CONCURRENCY,
    startup_timeout_s: float = 600.0,
) -> ReplayRun:
    """Replay ``ds``'s stream through the real services, one device server per policy
    (see the module docstring); same arguments and result as
    :func:`recsys.replay.engine.run_replay`.

    Raises:
        ValidationError: a policy without a deployed service (finetune, duet), bad config.
        RecsysError: a server failed to start (the message has its log), or an edit
            request failed (the replay would no longer match the in-process one).
    """
    if concurrency < 1:
        raise ValidationError(f"concurrency must be >= 1, got {concurrency}")
    t0 = time.perf_counter()
    specs = check_grpc_policies(policies)
    art_path, art, stream, calibrations = prepare_replay(ds, cfg, specs, cache=cache, users=users)
    thresholds = {b: c.threshold for b, c in calibrations.items()}
    events = [stream.user_events(int(u)) for u in stream.users]
    records: dict[str, EventRecords] = {}
    costs: dict[str, dict[str, Any]] = {}
    servers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="recsys-replay-grpc-") as name:
        tmp = Path(name)
        ds_dir = Path(write_dataset(ds, tmp / "dataset"))
        cloud = None
        try:
            if any(s.requests for s in specs):
                argv = cloud_argv(art, art_path, Path(cache), ds.name, tmp)
                cloud = ServerProcess(argv, name="cloud", log_path=tmp / "cloud.log").start()
                cloud.wait_ready(timeout=startup_timeout_s)
                servers["cloud"] = {"argv": _display(argv, tmp, cache)}
            for spec in specs:
                argv = device_argv(
                    spec, cfg, art, ds_dir, thresholds, cloud.target if cloud else None
                )
                log = tmp / f"device-{len(servers)}.log"
                with ServerProcess(argv, name=f"device[{spec.label}]", log_path=log) as device:
                    device.wait_ready(timeout=startup_timeout_s)
                    cpu0 = device.cpu_seconds()
                    bar = tqdm(
                        total=len(events),
                        desc=f"grpc replay {spec.label}",
                        unit="user",
                        disable=not progress,
                    )
                    try:
                        parts = asyncio.run(
                            _drive(device.target, events, ds, cfg, spec, concurrency, bar)
                        )
                    finally:
                        bar.close()
                    cpu1 = device.cpu_seconds()
                records[spec.label] = _records(parts)
                cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
                costs[spec.label] = _costs(parts, len(records[spec.label]), cpu)
                servers[spec.label] = {"argv": _display(argv, tmp, cache)}
                failed = costs[spec.label]["failed_requests"]
                if failed:
                    raise RecsysError(
                        f"{failed} edit request(s) of policy {spec.label!r} failed (cloud "
                        f"deadline or error), so the replay no longer matches the in-process "
                        f"one; see the cloud log:\n{cloud.log_tail() if cloud else ''}"
                    )
        finally:
            if cloud is not None:
                cloud.close()
    meta = run_meta(ds, cfg, specs, art, art_path, Path(cache), stream, calibrations)
    meta.update(
        via="grpc",
        servers=servers,
        concurrency=concurrency,
        costs_note="over gRPC: uplink/downlink bytes are the serialized GenerateEdit request "
        "and response (+ a GetPrototype reply; the response also carries the generated item "
        "ids and tokens for audit); device_us is the device's decode + compose + validate + "
        "materialise time per edit, measured in the device server; cloud_ms is the cloud "
        "engine's time per edit; FLOPs and peak memory are not observable (NaN); "
        "device_server_cpu_* is the device server's whole CPU time, ranking included",
    )
    meta["prototypes"]["mode"] += "; the cloud runs a copy of the artefact that never refines"
    meta["seconds"] = {"total": time.perf_counter() - t0}
    return ReplayRun(records=records, costs=costs, meta=meta)


def run_live_experiment(
    ds: Dataset,
    cfg: ReplayConfig,
    experiment: Path,
    event_log: Path,
    *,
    cache: Path,
    users: Sequence[int] | None = None,
    progress: bool = True,
    concurrency: int = DEFAULT_CONCURRENCY,
    startup_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Live A/B traffic: the stream's users sent through ONE device server that serves
    ``experiment`` (``recsys serve device --experiment FILE --event-log LOG``), with the
    cloud beside it. Each user gets its arm from the device (hash of salt and user,
    persisted in a private store); a static arm never asks the cloud, an adapted arm's
    gate calibrates its threshold live from its budget. The device writes one line per
    event to ``event_log``, which ``recsys abtest analyze --events`` reads.

    Returns:
        what ran: users, events, the device's request counters and the servers' argv.
    """
    spec = PolicySpec("system", "gate", 1.0)  # any requesting spec: the arms decide
    art_path, art, stream, _ = prepare_replay(ds, cfg, [spec], cache=cache, users=users)
    events = [stream.user_events(int(u)) for u in stream.users]
    event_log = Path(event_log)
    event_log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="recsys-live-ab-") as name:
        tmp = Path(name)
        ds_dir = Path(write_dataset(ds, tmp / "dataset"))
        cloud_args = cloud_argv(art, art_path, Path(cache), ds.name, tmp)
        with ServerProcess(cloud_args, name="cloud", log_path=tmp / "cloud.log") as cloud:
            cloud.wait_ready(timeout=startup_timeout_s)
            dev_args = [
                *device_argv(None, cfg, art, ds_dir, {}, cloud.target),
                "--experiment", str(experiment), "--event-log", str(event_log),
                "--store-url", f"sqlite:///{tmp / 'assignments.sqlite'}",
            ]  # fmt: skip
            with ServerProcess(dev_args, name="device", log_path=tmp / "device.log") as device:
                device.wait_ready(timeout=startup_timeout_s)
                with tqdm(total=len(events), desc="live A/B", disable=not progress) as bar:
                    parts = asyncio.run(
                        _drive(device.target, events, ds, cfg, spec, concurrency, bar)
                    )
                status = asyncio.run(_device_status(device.target))
        return {
            "users": len(events),
            "events": int(sum(len(e.items) for e in events)),
            "edit_requests": int(status.edit_requests),
            "edit_failures": int(status.edit_failures),
            "failed_requests": int(sum(p.failed for p in parts)),
            "experiment": status.experiment,
            "servers": {
                "cloud": _display(cloud_args, tmp, cache),
                "device": _display(dev_args, tmp, cache),
            },
        }


async def _device_status(target: str) -> Any:
    from recsys.rpc.device.v1 import recommendation_pb2 as pb
    from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
    from recsys.serving.server import client_channel

    async with client_channel(target) as channel:
        return await pb_grpc.RecommendationServiceStub(channel).GetStatus(
            pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S
        )


def _display(argv: list[str], tmp: Path, cache: Path) -> list[str]:
    """Server arguments without machine-specific paths (TMP/..., CACHE/...)."""
    out = []
    for a in argv:
        a = a.replace(str(tmp), "TMP")
        a = a.replace(str(Path(cache).resolve()), "CACHE").replace(str(cache), "CACHE")
        out.append(a)
    return out


# ---- parity with the in-process engine ---------------------------------------------------
def parity_rows(local: ReplayRun, remote: ReplayRun) -> list[dict[str, Any]]:
    """Per policy: in-process vs gRPC NDCG@10 / HR@10 / UAUC, the largest per-event
    differences, events whose rank or request decision differ, and request counts."""
    rows = []
    for label, a in local.records.items():
        b = remote.records.get(label)
        if b is None:
            continue
        if len(a) != len(b) or (a.user != b.user).any() or (a.item != b.item).any():
            raise ValidationError(f"policy {label!r}: the two runs replayed different events")
        sa, sb = a.summary(), b.summary()
        rows.append(
            {
                "policy": label,
                "events": len(a),
                "ndcg@10 inprocess": sa["ndcg@10"],
                "ndcg@10 grpc": sb["ndcg@10"],
                "ndcg@10 |diff|": abs(sa["ndcg@10"] - sb["ndcg@10"]),
                "hr@10 |diff|": abs(sa["hr@10"] - sb["hr@10"]),
                "uauc |diff|": abs(sa["uauc"] - sb["uauc"]),
                "max event |auc diff|": float(np.abs(a.auc - b.auc).max()) if len(a) else 0.0,
                "rank differs": int((a.rank != b.rank).sum()),
                "request differs": int((a.requested != b.requested).sum()),
                "requests inprocess": local.costs[label]["requests"],
                "requests grpc": remote.costs[label]["requests"],
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recsys.replay.grpc_driver``: the same replay in process and through the
    services, and the parity table (``--json PATH`` writes every figure); or, with
    ``--live-experiment FILE --event-log LOG``, live A/B traffic through one device serving
    the experiment (then ``recsys abtest analyze --events LOG --experiment FILE``)."""
    import argparse

    from recsys import settings
    from recsys.cli.common import print_table, write_json
    from recsys.data.registry import load_dataset

    p = argparse.ArgumentParser(
        prog="python -m recsys.replay.grpc_driver", description=main.__doc__
    )
    p.add_argument("--dataset", default="ml-100k", help="dataset name or directory (ml-100k)")
    p.add_argument("--max-users", type=int, default=20, help="users replayed (default 20)")
    p.add_argument(
        "--policies",
        default="static,system:gate:0.2,system:timer:0.2",
        help="comma-separated static / system[:gate|timer[:BUDGET]] policies",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--live-experiment", metavar="FILE", help="experiment TOML: live A/B mode")
    p.add_argument("--event-log", metavar="LOG", help="the device's event log (live A/B mode)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.live_experiment:
        return _main_live(args)
    try:
        ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
        specs = [PolicySpec.parse(t) for t in args.policies.split(",") if t.strip()]
        cfg = ReplayConfig(seed=args.seed, max_users=args.max_users)
        cache = settings.cache_dir(args.cache_dir)
        t0 = time.perf_counter()
        local = run_replay(ds, cfg, specs, cache=cache)
        t1 = time.perf_counter()
        remote = run_replay_grpc(ds, cfg, specs, cache=cache, concurrency=args.concurrency)
        t2 = time.perf_counter()
        rows = parity_rows(local, remote)
    except RecsysError as exc:
        print(f"error: {exc}")
        return 2
    shown = [{k: f"{v:.1e}" if k.endswith("diff|") else v for k, v in r.items()} for r in rows]
    print_table(
        shown,
        title=f"Replay parity on {ds.name}: in process vs through the gRPC services, "
        f"{remote.meta['stream']['stream_users']} users, seed {args.seed} "
        f"(in process {t1 - t0:.0f} s, gRPC {t2 - t1:.0f} s)",
    )
    keys = (
        ("requests", "requests"),
        ("up B/req", "uplink_bytes_per_request"),
        ("down B/req", "downlink_bytes_per_request"),
        ("payload B/req", "payload_bytes_per_request"),
        ("prototype downloads", "prototype_downloads"),
        ("device us/event", "device_us_per_event"),
        ("cloud ms/req", "cloud_ms_per_request_mean"),
    )
    cost_rows = [
        {"policy": label, "via": via, **{name: costs[label][key] for name, key in keys}}
        for label in local.costs
        for via, costs in (("inprocess", local.costs), ("grpc", remote.costs))
    ]
    print_table(
        cost_rows,
        title="Costs: in process (estimated uplink, payload bytes) vs gRPC (serialized "
        "messages, prototypes re-sent when the device reports another one)",
    )
    write_json(
        args.json,
        {
            "parity": rows,
            "costs": cost_rows,
            "config": cfg.to_dict(),
            "dataset": remote.meta["dataset"],
            "seed": args.seed,
            "stream": remote.meta["stream"],
            "costs_inprocess": local.costs,
            "costs_grpc": remote.costs,
            "gate": remote.meta["gate"],
            "seconds": {"inprocess": t1 - t0, "grpc": t2 - t1},
        },
    )
    return 0


def _main_live(args: Any) -> int:
    from recsys import settings
    from recsys.cli.common import print_table, write_json
    from recsys.data.registry import load_dataset

    try:
        if not args.event_log:
            raise ValidationError("--live-experiment needs --event-log PATH")
        ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
        cfg = ReplayConfig(seed=args.seed, max_users=args.max_users)
        t0 = time.perf_counter()
        info = run_live_experiment(
            ds,
            cfg,
            Path(args.live_experiment),
            Path(args.event_log),
            cache=settings.cache_dir(args.cache_dir),
            concurrency=args.concurrency,
        )
    except RecsysError as exc:
        print(f"error: {exc}")
        return 2
    info["seconds"] = time.perf_counter() - t0
    rows = [{k: v for k, v in info.items() if k != "servers"}]
    print_table(rows, title=f"Live A/B traffic on {ds.name} through one device server")
    print(
        f"analyse it: recsys abtest analyze --events {args.event_log} "
        f"--experiment {args.live_experiment} --out DIR"
    )
    write_json(args.json, {"live": info, "config": cfg.to_dict(), "dataset": ds.name})
    return 0


__all__ = [
    "check_grpc_policies",
    "cloud_argv",
    "device_argv",
    "main",
    "parity_rows",
    "run_live_experiment",
    "run_replay_grpc",
]

if __name__ == "__main__":
    raise SystemExit(main())
