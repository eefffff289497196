"""Parity of the two drivers: the same replay in process and through the gRPC services
(``recsys replay --parity``).

:func:`run_parity` replays the same users, seed and policies with both drivers of
:func:`recsys.replay.engine.run_replay`; :func:`parity_rows` compares their figures per
policy (metric differences, events whose rank or request decision differ, and whether
that is within the parity's tolerance: no request decision differs, at most
:data:`RANK_TOLERANCE` ranks move, per-event AUCs within :data:`AUC_TOLERANCE`; the two
paths batch the encoder and the head differently, so two items whose scores are within
float rounding of each other may swap), and :func:`parity_cost_rows` puts their costs
side by side. ``system-refine`` policies are compared like the others: their device
server uplinks fp32 user states and the cloud refines on them
(:mod:`recsys.replay.services`); with fp16 states 3 of 1,040 ranks moved on ml-100k
(20 users, gate 10 %), so the replay sends fp32.

Global time (``system-live``): the in-process side runs with ``slice_s=0`` (one request
per slice, the cloud answering one request at a time, as the cloud server does) and the
gRPC side through :mod:`recsys.replay.grpc_global` (one cloud server refining a fresh
bank in the store); besides the events, :func:`global_parity_rows` compares the
prototype versions each bank wrote and the versions each store holds
(:attr:`ParityResult.store_versions`: counted in the store, on any backend).

Example::

    result = run_parity(ds, ReplayConfig(max_users=20), specs, cache=settings.cache_dir())
    parity_rows(result.local, result.remote)[0]["ndcg@10 |diff|"]
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.data import Dataset
from recsys.errors import ValidationError
from recsys.replay.config import GrpcOptions, PolicySpec, ReplayConfig
from recsys.replay.engine import ReplayRun, run_replay

logger = logging.getLogger(__name__)

DEFAULT_POLICIES = "static,system:gate:0.2,system:timer:0.2"  # CLI default of --parity
REFINE_POLICIES = "static,system-refine:gate:0.1,system-refine:timer:0.2"  # issue 13's check
RANK_TOLERANCE = 1  # events whose rank may differ (float-rounding ties)
AUC_TOLERANCE = 1e-5  # largest per-event AUC difference
DEFAULT_USERS = 20  # CLI default of --parity / --live-experiment

# (column, cost key) of the side-by-side cost table
COST_COLUMNS = (
    ("requests", "requests"),
    ("up B/req", "uplink_bytes_per_request"),
    ("down B/req", "downlink_bytes_per_request"),
    ("payload B/req", "payload_bytes_per_request"),
    ("prototype downloads", "prototype_downloads"),
    ("device us/event", "device_us_per_event"),
    ("cloud ms/req", "cloud_ms_per_request_mean"),
)


@dataclass
class ParityResult:
    """Both runs and their wall times (seconds); with a global-time policy, the
    prototype versions each run left in its store (``{"inprocess": n, "grpc": m}``)."""

    local: ReplayRun
    remote: ReplayRun
    seconds: dict[str, float]
    store_versions: dict[str, int | None] = dataclasses.field(default_factory=dict)


def replay_versions(url: str) -> int:
    """Versions of the replay banks (prototypes named ``replay-*``) in the store at ``url``."""
    from codebook.store import PrototypeStore
    from recsys.replay.grpc_global import store_summary

    with PrototypeStore.open(url, upgrade=True) as store:
        return int(store_summary(store, "replay")["versions"])


def run_parity(
    ds: Dataset,
    cfg: ReplayConfig,
    policies: Sequence[PolicySpec],
    *,
    cache: Path,
    options: GrpcOptions | None = None,
    progress: bool = True,
) -> ParityResult:
    """The same replay in process, then through the services. With a global-time policy
    the in-process side serves one request per slice (``slice_s=0``), and each side's
    store is counted (a temporary SQLite store when ``cfg.store_url`` is None)."""
    shared = any(s.global_time for s in policies)
    local_cfg = dataclasses.replace(cfg, slice_s=0.0) if shared else cfg
    tmp = tempfile.TemporaryDirectory(prefix="recsys-parity-") if shared else None
    try:
        url = None
        if shared:
            url = cfg.store_url or f"sqlite:///{Path(tmp.name) / 'inprocess.sqlite'}"
            local_cfg = dataclasses.replace(local_cfg, store_url=url)
            before = replay_versions(url)
        t0 = time.perf_counter()
        local = run_replay(ds, local_cfg, policies, cache=cache, progress=progress)
        t1 = time.perf_counter()
        versions: dict[str, int | None] = {}
        if shared:
            versions["inprocess"] = replay_versions(url) - before
        remote = run_replay(
            ds, cfg, policies, cache=cache, progress=progress, via="grpc", grpc=options
        )
        t2 = time.perf_counter()
        if shared:
            versions["grpc"] = remote.meta.get("global_time", {}).get("store", {}).get("versions")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return ParityResult(local, remote, {"inprocess": t1 - t0, "grpc": t2 - t1}, versions)


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
        moved, changed = int((a.rank != b.rank).sum()), int((a.requested != b.requested).sum())
        auc = float(np.abs(a.auc - b.auc).max()) if len(a) else 0.0
        rows.append(
            {
                "policy": label,
                "events": len(a),
                "ndcg@10 inprocess": sa["ndcg@10"],
                "ndcg@10 grpc": sb["ndcg@10"],
                "ndcg@10 |diff|": abs(sa["ndcg@10"] - sb["ndcg@10"]),
                "hr@10 |diff|": abs(sa["hr@10"] - sb["hr@10"]),
                "uauc |diff|": abs(sa["uauc"] - sb["uauc"]),
                "max event |auc diff|": auc,
                "rank differs": moved,
                "request differs": changed,
                "requests inprocess": local.costs[label]["requests"],
                "requests grpc": remote.costs[label]["requests"],
                "matches": changed == 0 and moved <= RANK_TOLERANCE and auc <= AUC_TOLERANCE,
            }
        )
    return rows


def parity_cost_rows(local: ReplayRun, remote: ReplayRun) -> list[dict[str, Any]]:
    """Per policy and driver, the cost figures of :data:`COST_COLUMNS`."""
    return [
        {"policy": label, "via": via, **{name: costs[label][key] for name, key in COST_COLUMNS}}
        for label in local.costs
        if label in remote.costs
        for via, costs in (("inprocess", local.costs), ("grpc", remote.costs))
    ]


def global_parity_rows(result: ParityResult) -> list[dict[str, Any]]:
    """The shared cloud of a global-time parity, one row: requests, prototype versions
    written (refinements + spawns) and prototypes at the end per driver, the versions
    each store holds, and whether they all agree ([] without a global-time policy)."""
    a = result.local.meta.get("global_time")
    b = result.remote.meta.get("global_time")
    if not a or not b or "prototypes" not in a or "prototypes" not in b:
        return []
    pa, pb = a["prototypes"], b["prototypes"]
    sv = result.store_versions
    row = {
        "bank": "system-live",
        "requests inprocess": sum(a["requests"].values()),
        "requests grpc": sum(b["requests"].values()),
        "versions written inprocess": pa["versions_written"],
        "versions written grpc": pb["versions_written"],
        "refinements inprocess": pa["refinements"],
        "refinements grpc": pb["refinements"],
        "spawned inprocess": pa["spawned"],
        "spawned grpc": pb["spawned"],
        "prototypes inprocess": pa["prototypes"],
        "prototypes grpc": pb["prototypes"],
        "store versions inprocess": sv.get("inprocess"),
        "store versions grpc": sv.get("grpc"),
        "store backend": b.get("store_backend"),
    }
    row["matches"] = all(
        row[f"{k} inprocess"] == row[f"{k} grpc"]
        for k in ("requests", "versions written", "refinements", "spawned", "prototypes",
                  "store versions")
    )  # fmt: skip
    return [row]


__all__ = [
    "AUC_TOLERANCE",
    "DEFAULT_POLICIES",
    "DEFAULT_USERS",
    "RANK_TOLERANCE",
    "REFINE_POLICIES",
    "ParityResult",
    "global_parity_rows",
    "parity_cost_rows",
    "parity_rows",
    "replay_versions",
    "run_parity",
]
