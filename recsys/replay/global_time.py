"""The global-time replay: one shared cloud serves every device's requests in stream order.

The per-device replay (:mod:`recsys.replay.replayer`) is exact for every policy whose
edits depend on the device's own events only (static, fine-tuning, DUET, the system
with its prototype bank frozen at the artefact's version, system-noproto,
system-refine). Two kinds of edit depend on *other* devices' earlier requests:

* ``system-live``: the full system whose prototype bank is refined online: every
  request's edit code joins its nearest prototype, every ``refine_every`` member codes
  fold into a new version written to the store (:class:`codebook.prototypes.
  PrototypeBank`, SQLite by default, PostgreSQL with ``ReplayConfig.store_url``), far
  members may spawn a prototype; devices download a prototype version the first time
  they are sent a residual against it;
* ``system-continual``: the system without prototypes whose adaptor keeps learning
  (:mod:`codebook.continual`) from the uplinked examples (a request's tokens and summary,
  completed by the items and states the device's next request uplinks).

:func:`replay_global` runs the first group per device (``replay_devices``, any worker
count), then this module's :class:`GlobalCloud` over the second. Each global-time
policy has its own cloud state (:class:`PolicyCloud`: its own bank, or its own learner),
fed only by its own requests, so a 10 % budget learns from 10 % of the requests. Every
device's requests of those policies are merged in stream order, **sorted by (request
time, user, history length, policy label)**, where a request made after the device's
event ``L - 1`` has that event's timestamp (a request before any replay event has the
first replay event's), and cut into slices of ``cfg.slice_s`` stream seconds (default:
the period's span / 200; 0: one request per slice). A slice's requests are generated
in one batch against the cloud as it was when the slice began; then the bank observes
them in that order and their uplinked examples join the learner; learners refresh at
the first slice at or after each ``continual.interval_s`` boundary (default: span / 10).
So an edit depends only on requests of earlier slices (all strictly earlier in stream
time) and on its own device's history: no event at or after time t influences an edit
served before t (tested). Then each device's events are scored with those edits by the
same :meth:`Replayer.replay_user` as every other policy. Deterministic for a seed.

Example::

    results, cloud = replay_global(args, events, progress=False)
    cloud["prototypes"]["versions_written"], cloud["store"]["writes_per_s"]
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.adaptor import unbatch
from codebook.adaptor_artifact import fresh_bank_from_artifact
from codebook.continual import ContinualLearner, UplinkExample
from codebook.prototypes import PrototypeBank
from codebook.quantizer import nearest
from codebook.store import PrototypeStore
from recsys.adaptor_inputs import uplink_window
from recsys.replay.config import GLOBAL_SLICES, LIVE
from recsys.replay.edits import DeviceEdit
from recsys.replay.records import UserResult
from recsys.replay.replayer import Replayer, ReplayerArgs, replay_devices
from recsys.replay.stream import UserEvents

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class CloudRequest:
    """One request of a global-time policy; the field order is the serving order."""

    time: int  # stream time (the timestamp of the device's event L - 1)
    user: int
    length: int  # history length L the request is made from
    policy: str  # the policy's label


def request_time(ev: UserEvents, length: int) -> int:
    """Stream time of a request made from ``ev.sequence[:length]`` (module docstring)."""
    i = length - 1 - len(ev.start)
    return int(ev.timestamps[max(i, 0)])


def collect_requests(
    rep: Replayer, events: Sequence[UserEvents]
) -> tuple[list[CloudRequest], dict[int, UserEvents]]:
    """Every device's requests of the global-time policies, in serving order."""
    out = []
    for ev in events:
        plan = rep.request_plan(ev)
        for s in rep.specs:
            if s.global_time:
                for length in plan.lengths[rep.keys[s.label]].tolist():
                    out.append(CloudRequest(request_time(ev, length), ev.user, length, s.label))
    return sorted(out), {ev.user: ev for ev in events}


@dataclass
class _Pending:
    """A device's last continual request, waiting for what its next one uplinks."""

    length: int
    codes: np.ndarray  # [N, L+1]
    scores: np.ndarray | None
    summary: torch.Tensor  # [S]
    seen: np.ndarray  # every item the device uplinked up to this request


@dataclass
class PolicyCloud:
    """What the cloud learns for one global-time policy: each policy has its own (a
    policy at a 10 % budget learns only from its own 10 % of requests)."""

    kind: str
    bank: PrototypeBank | None = None
    learner: ContinualLearner | None = None
    pending: dict[int, _Pending] = dataclasses.field(default_factory=dict)
    refreshes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    store_s: float = 0.0
    cloud_s: float = 0.0


class GlobalCloud:
    """The one cloud of a global-time replay (see the module docstring).

    Args:
        rep: the :class:`Replayer` of the global-time policies (its :class:`EditMaker`
            generates, encodes and delivers the edits).
        store: an open prototype store (``system-live``); each live policy's bank is a
            separate set of prototypes in it.
    """

    def __init__(self, rep: Replayer, store: PrototypeStore | None) -> None:
        self.rep, self.maker, self.cfg = rep, rep.edits, rep.cfg
        self.clouds: dict[str, PolicyCloud] = {}
        for i, s in enumerate(x for x in rep.specs if x.global_time):
            pc = PolicyCloud(s.edit_kind)
            if s.edit_kind == LIVE:
                if store is None:
                    raise ValueError("system-live needs a prototype store")
                # new names per run and policy: a store may hold earlier runs' prototypes
                pc.bank = fresh_bank_from_artifact(
                    self.maker.art, store, f"replay-{time.time_ns()}-{i}",
                    decode=self.maker.adaptor.decode,
                )  # fmt: skip
            else:
                pc.learner = ContinualLearner(
                    self.maker.adaptor, self.maker.head, self.cfg.continual
                )
            self.clouds[s.label] = pc
        self.window = self.maker.tcfg.windows.window

    # ---- the stream ----------------------------------------------------------------------
    def run(
        self, requests: Sequence[CloudRequest], events: Mapping[int, UserEvents]
    ) -> dict[int, dict[str, dict[int, DeviceEdit]]]:
        """Serve ``requests`` (serving order) slice by slice; user -> policy -> length ->
        edit."""
        edits = {u: {label: {} for label in self.clouds} for u in events}
        self.slices = 0
        if not requests:
            return edits
        t0 = requests[0].time
        span = max(requests[-1].time - t0, 1)
        self.slice_s = span / GLOBAL_SLICES if self.cfg.slice_s is None else self.cfg.slice_s
        self.interval_s = self.cfg.continual.interval_s or span / 10
        if self.slice_s == 0:  # one request per slice, in serving order
            slice_of = list(range(len(requests)))
            starts = [r.time for r in requests]
        else:
            slice_of = [int((r.time - t0) // self.slice_s) for r in requests]
            starts = [t0 + k * self.slice_s for k in slice_of]
        next_refresh = t0 + self.interval_s
        a = 0
        while a < len(requests):
            b = a
            while b < len(requests) and slice_of[b] == slice_of[a]:
                b += 1
            while starts[a] >= next_refresh:
                for pc in self.clouds.values():
                    if pc.learner is not None:
                        pc.refreshes.append(pc.learner.refresh() | {"at": next_refresh})
                next_refresh += self.interval_s
            self._serve_slice(requests[a:b], events, edits)
            self.slices += 1
            a = b
        return edits

    def _serve_slice(
        self,
        reqs: Sequence[CloudRequest],
        events: Mapping[int, UserEvents],
        edits: dict[int, dict[str, dict[int, DeviceEdit]]],
    ) -> None:
        for label, pc in self.clouds.items():
            mine = [r for r in reqs if r.policy == label]
            if not mine:
                continue
            seqs = [events[r.user].sequence for r in mine]
            hists = [s[: r.length] for s, r in zip(seqs, mine, strict=True)]
            states = self.rep.history_states(hists)  # [R, D]
            tc = time.perf_counter()
            summary = self.maker.summaries(hists, states).clone()  # [R, 2D]
            codes, scores = self.maker.adaptor_tokens(hists)
            adaptor = pc.learner.adaptor if pc.learner is not None else self.maker.adaptor
            with torch.inference_mode():
                sc = None if scores is None else torch.from_numpy(scores)
                gen = adaptor(torch.from_numpy(codes), sc, summary)
            gen_ms = (time.perf_counter() - tc) * 1e3 / len(mine)
            if pc.bank is not None:
                self._deliver_live(pc, label, mine, gen, gen_ms, edits)
            else:
                for j, r in enumerate(mine):
                    edits[r.user][label][r.length] = self.maker._deliver(
                        unbatch(gen.tensors, j), r.length, gen_ms, None, states_uplinked=True
                    )
                self._collect_examples(pc, mine, seqs, codes, scores, summary)
            pc.cloud_s += time.perf_counter() - tc

    def _deliver_live(self, pc: PolicyCloud, label, reqs, gen, gen_ms, edits) -> None:
        """Residuals against the bank as it was at the slice's start, then the bank
        observes the slice's codes in serving order (new versions go to the store)."""
        bank = pc.bank
        ids, cents = bank.codes()
        code = gen.code.numpy()
        pids = [ids[k] for k in nearest(code, cents).tolist()]
        protos = {}
        for pid in set(pids):
            version, flat = bank.edit(pid)
            protos[pid] = self.maker.prototype((pid, version), flat)
        observed = []
        for j, r in enumerate(reqs):
            e = self.maker._deliver(
                unbatch(gen.tensors, j), r.length, gen_ms, protos[pids[j]], adaptor=True
            )
            edits[r.user][label][r.length] = e
            observed.append((str(r.user), code[j], e.residual_norm, pids[j]))
        ts = time.perf_counter()
        for device, c, norm, pid in observed:
            bank.observe(device, c, norm, pid)
        pc.store_s += time.perf_counter() - ts

    def _collect_examples(self, pc: PolicyCloud, reqs, seqs, codes, scores, summary) -> None:
        """Complete each device's previous request with what this one uplinked: the items
        after it and the states before them (the last ``refine.positions`` positions).
        The softmax excludes every item the device had uplinked by the earlier request
        (as training excluded the history: excluding only the last window teaches the
        adaptor to push down popular items users saw long ago, measured: -0.004 NDCG@10)."""
        ring = self.cfg.refine.positions
        done, prefixes = [], []
        for j, (r, seq) in enumerate(zip(reqs, seqs, strict=True)):
            prev = pc.pending.get(r.user)
            if prev is not None:
                lo = max(prev.length, r.length - ring)  # positions the uplink covers
                hi = min(prev.length + self.window, r.length)
                if hi > lo:
                    done.append((r.user, prev, seq, np.arange(lo, hi)))
                    prefixes += [seq[:p] for p in range(lo, hi)]
            window = uplink_window(seq[: r.length], self.cfg.uplink_items)
            seen = window if prev is None else np.union1d(prev.seen, window)
            pc.pending[r.user] = _Pending(
                r.length, codes[j], None if scores is None else scores[j], summary[j], seen
            )
        if not done:
            return
        states = self.rep.history_states(prefixes).clone()  # [sum W_j, D]
        at = 0
        for user, prev, seq, pos in done:
            tg = np.full(self.window, -1, dtype=np.int64)
            tg[: len(pos)] = seq[pos]
            st = torch.zeros(self.window, states.shape[1])
            st[: len(pos)] = states[at : at + len(pos)]
            at += len(pos)
            pc.learner.add(
                UplinkExample(user, prev.codes, prev.scores, prev.summary, st, tg, prev.seen)
            )

    def summary(self, requests: Sequence[CloudRequest], seconds: float) -> dict[str, Any]:
        """What the cloud did, per policy and in all: requests, slices, bank versions and
        store writes (live policies summed), learner refreshes."""
        out: dict[str, Any] = {
            "order": "(request time, user, history length, policy)",
            "slice_s": getattr(self, "slice_s", None),
            "refresh_interval_s": getattr(self, "interval_s", None),
            "requests": {k: sum(r.policy == k for r in requests) for k in self.clouds},
            "slices": getattr(self, "slices", 0),
            "cloud_seconds": {k: pc.cloud_s for k, pc in self.clouds.items()},
            "seconds": seconds,
            "policies": {},
        }
        totals = {"versions_written": 0, "refinements": 0, "spawned": 0, "prototypes": 0}
        writes, write_s = 0, 0.0
        for label, pc in self.clouds.items():
            if pc.bank is not None:
                s = pc.bank.summary()
                mine = {
                    "prototypes": s["prototypes"],
                    "versions_written": s["refinements"] + s["spawned"],
                    "refinements": s["refinements"],
                    "spawned": s["spawned"],
                    "spawn_threshold": s["spawn_threshold"],
                    "store_writes": s["refinements"] + s["spawned"] + len(pc.bank._assigned),
                    "store_write_seconds": pc.store_s,
                }
                for k in totals:
                    totals[k] += mine[k]
                writes += mine["store_writes"]
                write_s += pc.store_s
            else:
                done = [r for r in pc.refreshes if r.get("steps")]
                mine = {
                    "examples": pc.learner.seen_examples,
                    "refreshes": len(done),
                    "accepted": sum(r["accepted"] for r in done),
                    "refresh_ms_mean": float(np.mean([r["ms"] for r in done] or [0.0])),
                    "config": self.cfg.continual.to_dict(),
                    "history": pc.refreshes,
                }
            out["policies"][label] = mine
        if any(pc.bank is not None for pc in self.clouds.values()):
            out["prototypes"] = {"mode": "refined online in global stream time"} | totals
            out["store"] = {
                "writes": writes,
                "write_seconds": write_s,
                "writes_per_s": writes / write_s if write_s else None,
            }
        return out


def replay_global(
    args: ReplayerArgs,
    events: list[UserEvents],
    *,
    progress: bool = True,
) -> tuple[list[UserResult], dict[str, Any]]:
    """The per-device policies through :func:`replay_devices`, the global-time ones
    through one :class:`GlobalCloud`; results in the order of ``events``."""
    art_path, cache, dataset, cfg, specs, calibrations = args
    local = [s for s in specs if not s.global_time]
    shared = [s for s in specs if s.global_time]
    results = (
        replay_devices((art_path, cache, dataset, cfg, local, calibrations), events,
                       progress=progress)
        if local
        else [UserResult(user=ev.user, records={}) for ev in events]
    )  # fmt: skip
    t0 = time.perf_counter()
    rep = Replayer(art_path, cache, dataset, cfg, shared, calibrations)
    tmp = None
    try:
        url = cfg.store_url
        if url is None:
            tmp = tempfile.TemporaryDirectory(prefix="recsys-replay-store-")
            url = f"sqlite:///{Path(tmp.name) / 'prototypes.sqlite'}"
        store = (
            PrototypeStore.open(url, upgrade=True)
            if LIVE in {s.edit_kind for s in shared}
            else None
        )
        try:
            cloud = GlobalCloud(rep, store)
            requests, by_user = collect_requests(rep, events)
            edits = cloud.run(requests, by_user)
            for res, ev in zip(results, events, strict=True):
                mine = rep.replay_user(ev, injected=edits[ev.user])
                res.records |= mine.records
                res.costs |= mine.costs
            info = cloud.summary(requests, time.perf_counter() - t0)
            info["store_backend"] = url.split(":", 1)[0]
        finally:
            if store is not None:
                store.close()
    finally:
        rep.close()
        if tmp is not None:
            tmp.cleanup()
    return results, info
