"""The global-time replay through the REAL services: ``system-live`` against one cloud
server that refines its prototype bank online into the store.

The twin of :mod:`recsys.replay.global_time` with ``ReplayConfig(slice_s=0)`` (one
request per slice: the cloud answers one request at a time, observing each request's
code into the bank right after delivering its edit), called by
:func:`recsys.replay.engine.run_replay` with ``via="grpc"`` when a policy runs in global
time (:func:`replay_global_through_services`):

* the per-device policies (static, system with its frozen bank, system-refine) go
  through :func:`recsys.replay.grpc_driver.replay_through_services` unchanged;
* for the ``system-live`` policy, the driver creates a fresh bank in the store
  (``ReplayConfig.store_url``, else a temporary SQLite file; PostgreSQL when given)
  exactly as the in-process ``GlobalCloud`` does (:func:`codebook.adaptor_artifact.fresh_bank_from_artifact`: the artefact's
  centroids as version 1 of new prototypes ``replay-<ns>-k`` with the artefact's member
  counts and spawn threshold; ``refine_every`` from the artefact's config), then starts
  ONE cloud server on a copy of the artefact that names that bank and keeps refining it
  (:func:`recsys.replay.services.live_cloud_argv`; micro-batching off) and one device
  server holding every user;
* every device's events are merged in stream order, **sorted by (timestamp, user,
  position)**, and replayed one at a time (``Recommend``, then ``RecordEvent`` with
  ``wait_for_edit``; a device's first request before its first event): so the cloud sees
  the GenerateEdit requests in the in-process order (request time, user, history
  length). For each request the cloud's ``ComposedEngine`` assigns the nearest
  prototype on the bank's current codes, makes the residual against the current version,
  answers, and observes the code with the residual norm (refine every ``refine_every``
  members, spawn on far members): what ``GlobalCloud._deliver_live`` does per request.

What the cloud wrote is read back from the store afterwards (:func:`store_summary`:
versions, refinements, spawns, device assignments), so the figures are the store's, on
any backend.

Limits: one ``system-live`` policy per run (in process, several live policies share one
bank that serves the union of their request points; one device server per policy cannot
reproduce that); ``system-continual`` runs in process only. Device ids on the wire are the
dataset's user ids (in process: the user index); they only name the store's device
assignments.

Example::

    results, extra = replay_global_through_services(ds, cfg, specs, prep, events,
                                                    cache=cache, options=GrpcOptions())
    extra["global_time"]["prototypes"]["versions_written"], extra["global_time"]["store"]
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from codebook.adaptor_artifact import fresh_bank_from_artifact
from codebook.store import PrototypeStore
from recsys.data import Dataset, write_dataset
from recsys.errors import RecsysError, ValidationError
from recsys.replay.config import CONTINUAL, GrpcOptions, PolicySpec, ReplayConfig
from recsys.replay.grpc_driver import COSTS_NOTE, DeviceReplay, replay_through_services
from recsys.replay.records import UserResult
from recsys.replay.services import (
    device_argv,
    display_argv,
    live_cloud_argv,
    server,
    wait_ready,
)
from recsys.replay.stream import UserEvents

if TYPE_CHECKING:
    from recsys.replay.engine import PreparedReplay

ORDER = "(timestamp, user, position): requests in (request time, user, history length) order"


def check_global_policies(specs: Sequence[PolicySpec]) -> PolicySpec:
    """The one ``system-live`` policy the services can replay in global time; a clear
    error for ``system-continual`` or several live policies."""
    shared = [s for s in specs if s.global_time]
    cont = [s.label for s in shared if s.edit_kind == CONTINUAL]
    if cont:
        raise ValidationError(
            f"{cont}: the continual cloud runs in the in-process global-time replay only "
            "(the cloud service has no learner); replay them without --via grpc"
        )
    if len(shared) != 1:
        raise ValidationError(
            f"--via grpc replays one system-live policy per run, got {[s.label for s in shared]}: "
            "each live policy learns from its own requests, which needs its own refining "
            "cloud server (not built); run them one at a time"
        )
    return shared[0]


def store_summary(store: PrototypeStore, name_prefix: str) -> dict[str, Any]:
    """What the store holds of the bank ``name_prefix-*``: prototypes, versions (all of
    them, "init" included), versions written since (refinements + spawns) and device
    assignments."""
    from sqlalchemy import func, select

    from codebook.store.models import DeviceAssignment, Prototype, PrototypeVersion

    with store.transaction(write=False) as session:
        mine = select(Prototype.id).where(Prototype.name.startswith(f"{name_prefix}-"))
        rows = session.execute(
            select(PrototypeVersion.reason, func.count())
            .where(PrototypeVersion.prototype_id.in_(mine))
            .group_by(PrototypeVersion.reason)
        ).all()
        assigned = session.execute(
            select(func.count()).where(DeviceAssignment.prototype_id.in_(mine))
        ).scalar_one()
    by = {str(reason): int(n) for reason, n in rows}
    return {
        "versions": sum(by.values()),
        "versions_by_reason": by,
        "refinements": by.get("refine", 0),
        "spawned": by.get("spawn", 0),
        "versions_written": sum(n for r, n in by.items() if r != "init"),
        "prototypes": by.get("init", 0) + by.get("spawn", 0),
        "device_assignments": int(assigned),
    }


def merged_steps(events: Sequence[UserEvents]) -> list[tuple[int, int, int]]:
    """Every device's events as (timestamp, user, position), sorted: the serving order."""
    out = [(int(t), int(ev.user), n) for ev in events for n, t in enumerate(ev.timestamps.tolist())]
    return sorted(out)


async def drive_global(
    target: str,
    events: list[UserEvents],
    ds: Dataset,
    cfg: ReplayConfig,
    spec: PolicySpec,
    options: GrpcOptions,
    bar: Any,
) -> list[DeviceReplay]:
    """Every device's events through the device server at ``target``, one step at a time
    in the merged order (:func:`merged_steps`); the devices in the order of ``events``."""
    from recsys.client import AsyncDeviceClient, ClientOptions

    async with AsyncDeviceClient(target, ClientOptions(timeout_s=options.rpc_timeout_s)) as client:
        devs = {ev.user: DeviceReplay(client, ev, ds, cfg, spec) for ev in events}
        for _, user, n in merged_steps(events):
            dev = devs[user]
            if n == 0:
                await dev.begin()
            await dev.event(n)
            if n == len(dev.ev.items) - 1:
                bar.update(1)
        return [devs[ev.user] for ev in events]


def _live_run(
    ds: Dataset,
    cfg: ReplayConfig,
    spec: PolicySpec,
    prep: PreparedReplay,
    events: list[UserEvents],
    *,
    cache: Path,
    options: GrpcOptions,
    progress: bool,
    tmp: Path,
    url: str,
) -> tuple[list[DeviceReplay], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The live policy through one refining cloud and one device server: the devices,
    the servers' info, the device server's costs, and the global-time summary."""
    t0 = time.perf_counter()
    prefix = f"replay-{time.time_ns()}"
    ts = time.perf_counter()
    with PrototypeStore.open(url, upgrade=True) as store:
        fresh_bank_from_artifact(prep.art, store, prefix)
    init_s = time.perf_counter() - ts
    backend = url.split(":", 1)[0]
    servers: dict[str, dict[str, Any]] = {}

    def shown(argv: list[str]) -> list[str]:  # a store URL may carry a password
        return display_argv([backend if a == url else a for a in argv], tmp, cache)

    argv = live_cloud_argv(prep.art, prep.art_path, cache, ds.name, tmp, store_url=url,
                           name_prefix=prefix)  # fmt: skip
    servers["cloud[global]"] = cinfo = {"argv": shown(argv)}
    thresholds = {b: c.threshold for b, c in prep.calibrations.items()}
    ds_dir = Path(write_dataset(ds, tmp / "dataset-global"))
    timeout = options.startup_timeout_s
    with server(argv, "cloud-global", tmp, cinfo, timeout) as cloud:
        dargv = device_argv(spec, cfg, prep.art, ds_dir, thresholds, cloud.target,
                            options.cloud_deadline_s)  # fmt: skip
        servers[spec.label] = dinfo = {"argv": shown(dargv)}
        with server(dargv, f"device[{spec.label}]", tmp, dinfo, timeout) as device:
            wait_ready(cloud, timeout, cinfo)
            wait_ready(device, timeout, dinfo)
            cpu0, cloud_cpu0 = device.cpu_seconds(), cloud.cpu_seconds()
            desc = f"grpc global replay {spec.label}"
            with tqdm(total=len(events), desc=desc, unit="user", disable=not progress) as bar:
                devs = asyncio.run(drive_global(device.target, events, ds, cfg, spec, options, bar))
            cpu1, cloud_cpu1 = device.cpu_seconds(), cloud.cpu_seconds()
            failed = sum(d.acc.failed_requests for d in devs)
            if failed and options.strict:
                raise RecsysError(
                    f"{failed} edit request(s) of policy {spec.label!r} failed (cloud deadline "
                    "or error), so the replay no longer matches the in-process one; see the "
                    f"cloud log:\n{cloud.log_tail()}"
                )
    with PrototypeStore.open(url) as store:
        st = store_summary(store, prefix)
    evaluated = sum(len(d.idx) for d in devs)
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    costs = {
        "device_server_cpu_s": cpu,
        "device_server_cpu_us_per_event": float("nan") if cpu is None else cpu * 1e6 / max(evaluated, 1),
    }  # fmt: skip
    requests = sum(d.acc.requests for d in devs)
    cloud_s = sum(sum(d.acc.cloud_ms) for d in devs) / 1e3
    writes = st["versions_written"] + st["device_assignments"]
    info = {
        "order": ORDER,
        "via": "grpc",
        "slice_s": 0.0,  # one request at a time
        "refresh_interval_s": None,
        "requests": {spec.label: requests},
        "slices": requests,
        "cloud_seconds": {spec.label: cloud_s},
        "cloud_server_cpu_s": None
        if cloud_cpu0 is None or cloud_cpu1 is None
        else cloud_cpu1 - cloud_cpu0,
        "seconds": time.perf_counter() - t0,
        "bank_init_seconds": init_s,
        "name_prefix": prefix,
        "prototypes": {
            "mode": "refined online in global stream time by the cloud server (system-live)",
            "prototypes": st["prototypes"],
            "versions_written": st["versions_written"],
            "refinements": st["refinements"],
            "spawned": st["spawned"],
            "spawn_threshold": float(
                prep.art.get("prototypes", {}).get("spawn_threshold", math.inf)
            ),
        },
        "store": {
            "writes": writes,
            "write_seconds": None,  # inside the cloud server, not observable here
            "writes_per_s": None,
            "versions": st["versions"],
            "device_assignments": st["device_assignments"],
        },
        "store_backend": backend,
    }
    return devs, servers, costs, info


def replay_global_through_services(
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
    """The devices of ``events`` through the real services, the ``system-live`` policy
    in global time (see the module docstring); mirrors
    :func:`recsys.replay.grpc_driver.replay_through_services`.

    Returns:
        (one :class:`UserResult` per device, in the order of ``events``; extra run meta:
        ``servers``, ``concurrency``, ``costs_note``, ``costs`` (per policy the device
        server's CPU time) and ``global_time`` (the keys of the in-process
        ``GlobalCloud.summary``, read from the store, plus ``store.versions``)).

    Raises:
        ValidationError: ``system-continual``, or more than one ``system-live`` policy.
        RecsysError: a server failed to start, or (``options.strict``) an edit failed.
    """
    live = check_global_policies(specs)
    local = [s for s in specs if not s.global_time]
    if local:
        results, extra = replay_through_services(
            ds, cfg, local, prep, events, cache=cache, options=options, progress=progress
        )
    else:
        results = [UserResult(user=ev.user, records={}) for ev in events]
        extra = {"servers": {}, "concurrency": options.concurrency, "costs_note": COSTS_NOTE,
                 "costs": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="recsys-replay-grpc-global-") as tmp_name:
        tmp = Path(tmp_name)
        url = cfg.store_url or f"sqlite:///{tmp / 'prototypes.sqlite'}"
        devs, servers, costs, info = _live_run(
            ds, cfg, live, prep, events, cache=cache, options=options, progress=progress,
            tmp=tmp, url=url,
        )  # fmt: skip
    for res, dev in zip(results, devs, strict=True):
        res.records[live.label], res.costs[live.label] = dev.result()
    extra["servers"] |= servers
    extra["costs"][live.label] = costs
    extra["global_time"] = info
    return results, extra


__all__ = [
    "ORDER",
    "check_global_policies",
    "drive_global",
    "merged_steps",
    "replay_global_through_services",
    "store_summary",
]
