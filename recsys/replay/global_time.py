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
count), then this module's :class:`GlobalCloud` over the second: every device's requests
of those kinds are merged in stream order, **sorted by (request time, user, history
length, kind)**, where a request made after the device's event ``L - 1`` has that event's
timestamp (a request before any replay event has the first replay event's), and cut
into slices of ``cfg.slice_s`` stream seconds (default: the period's span / 200). A slice's requests are generated in one
batch against the cloud as it was when the slice began; then the bank observes them in
that order and their uplinked examples join the learner; the learner refreshes at the
first slice at or after each ``continual.interval_s`` boundary (default: span / 10). So an edit depends only
on requests of earlier slices (all strictly earlier in stream time) and on its own
device's history: no event at or after time t influences an edit served before t
(tested). Then each device's events are scored with those edits by the same
:meth:`Replayer.replay_user` as every other policy. Deterministic for a seed.

Example::

    results, cloud = replay_global(args, events, progress=False)
    cloud["prototypes"]["versions_written"], cloud["store"]["writes_per_s"]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.adaptor import unbatch
from codebook.continual import ContinualLearner, UplinkExample
from codebook.prototypes import PrototypeBank
from codebook.quantizer import nearest
from codebook.store import PrototypeStore
from recsys.adaptor_inputs import uplink_window
from recsys.replay.config import CONTINUAL, GLOBAL_SLICES, LIVE, LIVE_KINDS
from recsys.replay.edits import DeviceEdit
from recsys.replay.records import UserResult
from recsys.replay.replayer import Replayer, ReplayerArgs, replay_devices
from recsys.replay.stream import UserEvents

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class CloudRequest:
    """One request of a global-time kind; the field order is the serving order."""

    time: int  # stream time (the timestamp of the device's event L - 1)
    user: int
    length: int  # history length L the request is made from
    kind: str


def request_time(ev: UserEvents, length: int) -> int:
    """Stream time of a request made from ``ev.sequence[:length]`` (module docstring)."""
    i = length - 1 - len(ev.start)
    return int(ev.timestamps[max(i, 0)])


def collect_requests(
    rep: Replayer, events: Sequence[UserEvents]
) -> tuple[list[CloudRequest], dict[int, UserEvents]]:
    """Every device's requests of the global-time kinds, in serving order."""
    out = []
    for ev in events:
        plan = rep.request_plan(ev)
        for kind in LIVE_KINDS:
            for length in sorted(plan.points[kind]):
                out.append(CloudRequest(request_time(ev, length), ev.user, length, kind))
    return sorted(out), {ev.user: ev for ev in events}


@dataclass
class _Pending:
    """A device's last continual request, waiting for what its next one uplinks."""

    length: int
    codes: np.ndarray  # [N, L+1]
    scores: np.ndarray | None
    summary: torch.Tensor  # [S]
    seen: np.ndarray  # every item the device uplinked up to this request


class GlobalCloud:
    """The one cloud of a global-time replay (see the module docstring).

    Args:
        rep: the :class:`Replayer` of the global-time policies (its :class:`EditMaker`
            generates, encodes and delivers the edits).
        store: an open prototype store (``system-live``).
    """

    def __init__(self, rep: Replayer, store: PrototypeStore | None) -> None:
        self.rep, self.maker, self.cfg = rep, rep.edits, rep.cfg
        kinds = {s.edit_kind for s in rep.specs}
        self.bank: PrototypeBank | None = None
        if LIVE in kinds:
            if store is None:
                raise ValueError("system-live needs a prototype store")
            self.bank = self._fresh_bank(store)
        self.learner: ContinualLearner | None = None
        if CONTINUAL in kinds:
            self.learner = ContinualLearner(self.maker.adaptor, self.maker.head, self.cfg.continual)
        self.window = self.maker.tcfg.windows.window
        self.pending: dict[int, _Pending] = {}
        self.refreshes: list[dict[str, Any]] = []
        self.store_s = 0.0
        self.cloud_s = {kind: 0.0 for kind in LIVE_KINDS}

    def _fresh_bank(self, store: PrototypeStore) -> PrototypeBank:
        """The artefact's prototypes as version 1 of new prototypes named for this run."""
        m = self.maker
        art_protos = m.art_prototypes
        # new names per run: a PostgreSQL store may already hold earlier runs' prototypes
        pcfg = dataclasses.replace(m.pcfg, name_prefix=f"replay-{time.time_ns()}")
        threshold = float(art_protos.get("spawn_threshold", math.inf))
        return PrototypeBank.create(
            store,
            m.centroids,
            m.adaptor.decode,
            m.hspec,
            pcfg,
            bound=m.bound,
            bias_bound=m.bias_bound,
            member_counts=np.asarray(art_protos.get("sizes", np.zeros(len(m.centroids)))),
            spawn_threshold=threshold,
        )

    # ---- the stream ----------------------------------------------------------------------
    def run(
        self, requests: Sequence[CloudRequest], events: Mapping[int, UserEvents]
    ) -> dict[int, dict[str, dict[int, DeviceEdit]]]:
        """Serve ``requests`` (serving order) slice by slice; user -> kind -> length -> edit."""
        edits: dict[int, dict[str, dict[int, DeviceEdit]]] = {u: {} for u in events}
        for ev in events.values():
            for kind in LIVE_KINDS:
                edits[ev.user][kind] = {}
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
        self.slices = 0
        a = 0
        while a < len(requests):
            b = a
            while b < len(requests) and slice_of[b] == slice_of[a]:
                b += 1
            while self.learner is not None and starts[a] >= next_refresh:
                self.refreshes.append(self.learner.refresh() | {"at": next_refresh})
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
        for kind in LIVE_KINDS:
            mine = [r for r in reqs if r.kind == kind]
            if not mine:
                continue
            seqs = [events[r.user].sequence for r in mine]
            hists = [s[: r.length] for s, r in zip(seqs, mine, strict=True)]
            states = self.rep.history_states(hists)  # [R, D]
            tc = time.perf_counter()
            summary = self.maker.summaries(hists, states).clone()  # [R, 2D]
            codes, scores = self.maker.adaptor_tokens(hists)
            adaptor = self.learner.adaptor if kind == CONTINUAL else self.maker.adaptor
            with torch.inference_mode():
                sc = None if scores is None else torch.from_numpy(scores)
                gen = adaptor(torch.from_numpy(codes), sc, summary)
            gen_ms = (time.perf_counter() - tc) * 1e3 / len(mine)
            if kind == LIVE:
                self._deliver_live(mine, gen, gen_ms, edits)
            else:
                for j, r in enumerate(mine):
                    edits[r.user][kind][r.length] = self.maker._deliver(
                        unbatch(gen.tensors, j), r.length, gen_ms, None, states_uplinked=True
                    )
                self._collect_examples(mine, seqs, codes, scores, summary)
            self.cloud_s[kind] += time.perf_counter() - tc

    def _deliver_live(self, reqs, gen, gen_ms, edits) -> None:
        """Residuals against the bank as it was at the slice's start, then the bank
        observes the slice's codes in serving order (new versions go to the store)."""
        bank = self.bank
        ids, cents = bank.codes()
        code = gen.code.numpy()
        pids = [ids[k] for k in nearest(code, cents).tolist()]
        protos = {}
        for pid in set(pids):
            version, flat = bank.edit(pid)
            protos[pid] = self.maker.prototype((pid, version), flat)
        observed = []
        for j, r in enumerate(reqs):
            e = self.maker._deliver(unbatch(gen.tensors, j), r.length, gen_ms, protos[pids[j]])
            edits[r.user][LIVE][r.length] = e
            observed.append((str(r.user), code[j], e.residual_norm, pids[j]))
        ts = time.perf_counter()
        for device, c, norm, pid in observed:
            bank.observe(device, c, norm, pid)
        self.store_s += time.perf_counter() - ts

    def _collect_examples(self, reqs, seqs, codes, scores, summary) -> None:
        """Complete each device's previous request with what this one uplinked: the items
        after it and the states before them (the last ``refine.positions`` positions).
        The softmax excludes every item the device had uplinked by the earlier request
        (as training excluded the history: excluding only the last window teaches the
        adaptor to push down popular items users saw long ago, measured: -0.004 NDCG@10)."""
        ring = self.cfg.refine.positions
        done, prefixes = [], []
        for j, (r, seq) in enumerate(zip(reqs, seqs, strict=True)):
            prev = self.pending.get(r.user)
            if prev is not None:
                lo = max(prev.length, r.length - ring)  # positions the uplink covers
                hi = min(prev.length + self.window, r.length)
                if hi > lo:
                    done.append((r.user, prev, seq, np.arange(lo, hi)))
                    prefixes += [seq[:p] for p in range(lo, hi)]
            window = uplink_window(seq[: r.length], self.cfg.uplink_items)
            seen = window if prev is None else np.union1d(prev.seen, window)
            self.pending[r.user] = _Pending(
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
            self.learner.add(
                UplinkExample(user, prev.codes, prev.scores, prev.summary, st, tg, prev.seen)
            )

    def summary(self, requests: Sequence[CloudRequest], seconds: float) -> dict[str, Any]:
        """What the cloud did: requests, slices, bank versions and store writes, refreshes."""
        out: dict[str, Any] = {
            "order": "(request time, user, history length, kind)",
            "slice_s": getattr(self, "slice_s", None),
            "refresh_interval_s": getattr(self, "interval_s", None),
            "requests": {k: sum(r.kind == k for r in requests) for k in LIVE_KINDS},
            "slices": getattr(self, "slices", 0),
            "cloud_seconds": dict(self.cloud_s),
            "seconds": seconds,
        }
        if self.bank is not None:
            s = self.bank.summary()
            writes = s["refinements"] + s["spawned"] + len(self.bank._assigned)
            out["prototypes"] = {
                "mode": "refined online in global stream time (system-live)",
                "prototypes": s["prototypes"],
                "versions_written": s["refinements"] + s["spawned"],
                "refinements": s["refinements"],
                "spawned": s["spawned"],
                "spawn_threshold": s["spawn_threshold"],
            }
            out["store"] = {
                "writes": writes,
                "write_seconds": self.store_s,
                "writes_per_s": writes / self.store_s if self.store_s else None,
            }
        if self.learner is not None:
            done = [r for r in self.refreshes if r.get("steps")]
            out["continual"] = {
                "examples": self.learner.seen_examples,
                "refreshes": len(done),
                "accepted": sum(r["accepted"] for r in done),
                "refresh_ms_mean": float(np.mean([r["ms"] for r in done] or [0.0])),
                "config": self.cfg.continual.to_dict(),
                "history": self.refreshes,
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
