"""The gRPC replay driver: the replay core's devices through the REAL services.

Same protocol, stream, gate thresholds, records and costs as the in-process driver
(:mod:`recsys.replay.replayer`); called by :func:`recsys.replay.engine.run_replay` with
``via="grpc"``, it returns the same :class:`~recsys.replay.records.UserResult` per device,
but every decision and every score comes from the deployed servers
(:mod:`recsys.replay.services`: a cloud, and one device server per policy, child
processes on loopback ports; the first device server starts while the cloud loads).

Per device (user), in time order: a device that already has ``min_history`` events asks
for its first edit before its first replay event (``RequestEdit``); then for each event
``Recommend`` ranks with the current edit and returns the target's rank (full catalogue,
history excluded, ties pessimistic) and the scores of the target and its sampled
negatives (``probe_item_ids``), and ``RecordEvent`` (``wait_for_edit``) appends the event;
the device's trigger may ask the cloud, synchronously, and the edit serves later events.
Users run concurrently (``GrpcOptions.concurrency``); a user's results depend only on
its own events.
Every call goes through the typed client (:class:`recsys.client.AsyncDeviceClient`:
deadline ``GrpcOptions.rpc_timeout_s`` per attempt, retries on UNAVAILABLE with back-off).

Policies: ``static``, ``system`` (gate or timer) and ``system-refine`` (its device
uplinks its recent user states, the cloud refines the adaptor's edit on them and sends
it whole). ``finetune``, ``duet`` and ``system-noproto`` have no deployed service
(back-propagation on the device, a cloud without the LM, a cloud that always sends
residuals) and are rejected with a clear error
(:func:`recsys.replay.services.check_grpc_policies`).

Costs per policy are measured on the services: serialized GenerateEdit requests and
responses (the response also carries the generated item ids and tokens, for audit), the
device's time to decode, compose and materialise each edit (measured in the device
server), the cloud's engine time per edit, ``Recommend`` / ``RecordEvent`` round-trip
latencies (p50 / p99), failed edit requests, fallback answers, and the device server's
CPU time per evaluated event (ranking included, from /proc).

Example::

    run = run_replay(ds, ReplayConfig(max_users=20), [PolicySpec("static"),
                     PolicySpec("system", "gate", 0.2)], cache=cache, via="grpc")
    run.records["system gate 20%"].summary()["ndcg@10"], run.costs["static"]["recommend_ms_p99"]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.client import AsyncDeviceClient, ClientOptions, EditCost, EditOutcome
from recsys.data import Dataset, write_dataset
from recsys.errors import RecsysError
from recsys.metrics import sampled_auc
from recsys.replay.config import GrpcOptions, PolicySpec, ReplayConfig
from recsys.replay.costs import CostAccumulator
from recsys.replay.records import EventRecords, UserResult
from recsys.replay.services import cloud_argv, device_argv, display_argv, server, wait_ready
from recsys.replay.stream import UserEvents

if TYPE_CHECKING:
    from recsys.replay.engine import PreparedReplay

logger = logging.getLogger(__name__)

COSTS_NOTE = (
    "over gRPC: uplink/downlink bytes are the serialized GenerateEdit request and response "
    "(+ a GetPrototype reply; the response also carries the generated item ids and tokens "
    "for audit); device_us is the device's decode + compose + validate + materialise time "
    "per edit (+ assembling the uplinked user states for system-refine: the ones missing from "
    "its ring buffer cost one encoder pass), measured in the device server; cloud_ms is the cloud engine's time per edit; "
    "FLOPs and peak memory are not observable (NaN); recommend_ms / record_event_ms are "
    "round trips seen by the driver; device_server_cpu_* is the device server's whole CPU "
    "time, ranking included"
)


NO_COST = EditCost(0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)  # a finished request without a cost


class DeviceReplay:
    """One device's events through a device server, one step at a time (see the module
    docstring): :meth:`begin` (the first edit request, when the device already has
    ``min_history`` events), :meth:`event` for each event in order, :meth:`result`.
    :func:`replay_user` runs them in a row; the global-time driver
    (:mod:`recsys.replay.grpc_global`) interleaves every device's steps in stream order.

    Args:
        client: the device server's :class:`~recsys.client.AsyncDeviceClient` (its
            options carry the per-call deadline and the retries on UNAVAILABLE).
        ev / ds / cfg / spec: the device's events, the dataset, the replay config, the
            policy.
    """

    def __init__(
        self, client: AsyncDeviceClient, ev: UserEvents, ds: Dataset, cfg: ReplayConfig,
        spec: PolicySpec,
    ) -> None:  # fmt: skip
        self.client, self.ev, self.cfg, self.spec = client, ev, cfg, spec
        self.uid = str(ds.user_ids[ev.user])
        self.item_ids = ds.item_ids
        self.idx = np.flatnonzero(ev.evaluated)
        e = len(self.idx)
        self.rank = np.zeros(e, dtype=np.int64)  # [E]
        self.pos = np.zeros(e, dtype=np.float64)  # [E] target scores
        self.neg = np.zeros((e, ev.negatives.shape[1]), dtype=np.float64)  # [E, M]
        self.requested = np.zeros(e, dtype=bool)
        self.acc = CostAccumulator(rpc=True)
        self.row = 0

    def _note(self, reply: Any) -> None:
        """Count one edit request (its cost as measured by the device)."""
        acc, nan = self.acc, float("nan")
        acc.failed_requests += int(reply.outcome is EditOutcome.FAILED)
        e = reply.cost or NO_COST
        acc.add(
            decode_us=e.device_decode_us + e.device_states_us, apply_us=e.device_apply_us,
            device_flops=nan,
            device_peak_bytes=nan, uplink_bytes=e.bytes_up, downlink_bytes=e.bytes_down,
            payload_bytes=e.payload_bytes, cloud_ms=e.cloud_ms, initial=acc.requests == 0,
        )  # fmt: skip
        if e.prototype_bytes:
            acc.prototype_downloads += 1
            acc.prototype_bytes += e.prototype_bytes

    async def begin(self) -> None:
        """The device's first edit request, before its first replay event (if it has
        ``min_history`` events already and its policy requests)."""
        if self.spec.requests and len(self.ev.start) >= self.cfg.min_history:
            self._note(await self.client.request_edit(self.uid, wait_for_edit=True))

    async def event(self, n: int) -> None:
        """Event ``n``: ``Recommend`` (if evaluated), then ``RecordEvent`` (its trigger may
        ask the cloud, synchronously)."""
        ev, client, item_ids, acc = self.ev, self.client, self.item_ids, self.acc
        if ev.evaluated[n]:
            probes = [str(item_ids[ev.items[n]])] + [str(item_ids[j]) for j in ev.negatives[n]]
            t0 = time.perf_counter()
            rec = await client.recommend(self.uid, k=1, probe_item_ids=probes)
            acc.recommend_ms.append((time.perf_counter() - t0) * 1e3)
            acc.fallback_answers += int(rec.fallback)
            self.rank[self.row] = rec.probe_ranks[0]
            self.pos[self.row] = rec.probe_scores[0]
            self.neg[self.row] = rec.probe_scores[1:]
        t0 = time.perf_counter()
        reply = await client.record_event(
            self.uid, str(item_ids[ev.items[n]]), int(ev.timestamps[n]), wait_for_edit=True
        )
        acc.record_ms.append((time.perf_counter() - t0) * 1e3)
        if reply.edit_requested:
            self._note(reply)
        if ev.evaluated[n]:
            self.requested[self.row] = reply.edit_requested
            self.row += 1

    def result(self) -> tuple[EventRecords, CostAccumulator]:
        """The E evaluated events' records and the device's costs."""
        ev, idx, pos = self.ev, self.idx, self.pos
        auc = (
            sampled_auc(torch.from_numpy(pos), torch.from_numpy(self.neg)).numpy()
            if len(pos)
            else pos
        )
        records = EventRecords(
            user=np.full(len(idx), ev.user, dtype=np.int64),
            item=ev.items[idx],
            timestamp=ev.timestamps[idx],
            rank=self.rank,
            auc=auc,
            requested=self.requested,
        )
        return records, self.acc


async def replay_user(
    client: AsyncDeviceClient, ev: UserEvents, ds: Dataset, cfg: ReplayConfig, spec: PolicySpec
) -> tuple[EventRecords, CostAccumulator]:
    """One device's events through the device server (see the module docstring): its E
    evaluated events' records and its costs under ``spec``."""
    dev = DeviceReplay(client, ev, ds, cfg, spec)
    await dev.begin()
    for n in range(len(ev.items)):
        await dev.event(n)
    return dev.result()


async def drive(
    target: str,
    events: list[UserEvents],
    ds: Dataset,
    cfg: ReplayConfig,
    spec: PolicySpec,
    options: GrpcOptions,
    bar: Any,
) -> list[tuple[EventRecords, CostAccumulator]]:
    """All devices of one policy through the device server at ``target``,
    ``options.concurrency`` at a time; results in the order of ``events``."""
    sem = asyncio.Semaphore(options.concurrency)
    async with AsyncDeviceClient(target, ClientOptions(timeout_s=options.rpc_timeout_s)) as client:

        async def one(ev: UserEvents) -> tuple[EventRecords, CostAccumulator]:
            async with sem:
                res = await replay_user(client, ev, ds, cfg, spec)
                bar.update(1)
                return res

        return list(await asyncio.gather(*(one(ev) for ev in events)))


def _replay_policy(
    device: Any, events: list[UserEvents], ds: Dataset, cfg: ReplayConfig, spec: PolicySpec,
    options: GrpcOptions, progress: bool,
) -> tuple[list[tuple[EventRecords, CostAccumulator]], float | None]:  # fmt: skip
    """Every device of ``events`` through the ready device server of ``spec``: per device
    (records, costs), and the server's CPU seconds meanwhile (None: not measurable)."""
    cpu0 = device.cpu_seconds()
    desc = f"grpc replay {spec.label}"
    with tqdm(total=len(events), desc=desc, unit="user", disable=not progress) as bar:
        parts = asyncio.run(drive(device.target, events, ds, cfg, spec, options, bar))
    cpu1 = device.cpu_seconds()
    return parts, None if cpu0 is None or cpu1 is None else cpu1 - cpu0


def replay_through_services(
    ds: Dataset,
    cfg: ReplayConfig,
    specs: Sequence[PolicySpec],
    prep: PreparedReplay,
    events: list[UserEvents],
    *,
    cache: Path,
    options: GrpcOptions,
    progress: bool = True,
) -> tuple[list[UserResult], dict[str, Any]]:
    """The devices of ``events`` through the real services, one device server per policy
    (see the module docstring).

    Returns:
        (one :class:`UserResult` per device, in the order of ``events``; extra run meta:
        ``servers`` (argv, startup seconds, exit code), ``concurrency``, ``costs_note``,
        and ``costs``: per policy the device server's CPU time).

    Raises:
        RecsysError: a server failed to start (the message has its log), or, with
            ``options.strict``, an edit request failed (the replay would no longer match
            the in-process one).
    """
    thresholds = {b: c.threshold for b, c in prep.calibrations.items()}
    results = [UserResult(user=ev.user, records={}) for ev in events]
    servers: dict[str, dict[str, Any]] = {}
    server_costs: dict[str, dict[str, Any]] = {}
    timeout = options.startup_timeout_s
    with tempfile.TemporaryDirectory(prefix="recsys-replay-grpc-") as tmp_name:
        tmp = Path(tmp_name)
        ds_dir = Path(write_dataset(ds, tmp / "dataset"))
        cloud = None

        def device_server(spec: PolicySpec) -> contextlib.AbstractContextManager[Any]:
            target = cloud.target if cloud is not None and spec.requests else None
            argv = device_argv(
                spec, cfg, prep.art, ds_dir, thresholds, target, options.cloud_deadline_s
            )
            info = servers[spec.label] = {"argv": display_argv(argv, tmp, cache)}
            return server(argv, f"device[{spec.label}]", tmp, info, timeout)

        with contextlib.ExitStack() as stack:
            if any(s.requests for s in specs):
                refine = cfg.refine if any(s.refine for s in specs) else None
                argv = cloud_argv(prep.art, prep.art_path, cache, ds.name, tmp, refine)
                servers["cloud"] = {"argv": display_argv(argv, tmp, cache)}
                cloud = stack.enter_context(server(argv, "cloud", tmp, servers["cloud"], timeout))
            early = {}  # prestart: every device server now, beside the cloud
            if options.prestart:
                early = {s.label: stack.enter_context(device_server(s)) for s in specs}
            for spec in specs:
                with contextlib.ExitStack() as own:  # a device started now stops after its policy
                    device = early.get(spec.label) or own.enter_context(device_server(spec))
                    if cloud is not None:  # the first device started while the cloud loads
                        wait_ready(cloud, timeout, servers["cloud"])
                    wait_ready(device, timeout, servers[spec.label])
                    parts, cpu = _replay_policy(device, events, ds, cfg, spec, options, progress)
                for res, (records, acc) in zip(results, parts, strict=True):
                    res.records[spec.label], res.costs[spec.label] = records, acc
                evaluated = sum(len(r) for r, _ in parts)
                server_costs[spec.label] = {
                    "device_server_cpu_s": cpu,
                    "device_server_cpu_us_per_event": float("nan")
                    if cpu is None
                    else cpu * 1e6 / max(evaluated, 1),
                }
                failed = sum(acc.failed_requests for _, acc in parts)
                if failed and options.strict:
                    raise RecsysError(
                        f"{failed} edit request(s) of policy {spec.label!r} failed (cloud "
                        f"deadline or error), so the replay no longer matches the in-process "
                        f"one; see the cloud log:\n{cloud.log_tail() if cloud else ''}"
                    )
    extra = {
        "servers": servers,
        "concurrency": options.concurrency,
        "costs_note": COSTS_NOTE,
        "costs": server_costs,
    }
    return results, extra


__all__ = [
    "COSTS_NOTE",
    "NO_COST",
    "DeviceReplay",
    "drive",
    "replay_through_services",
    "replay_user",
]
