"""The device's serving logic, independent of gRPC: :class:`DeviceEngine`.

The engine is a thin facade the servicer (:mod:`device_ranker.service.servicer`) calls;
it composes the parts, each in its own module:

* :mod:`~device_ranker.service.users`: the users (bounded history, seen items, cached
  user state, active edit, gate state, lock), the item catalogue, each user's A/B arm
  and serving mode;
* :mod:`~device_ranker.service.ranking`: the ranking thread; Recommend calls are
  micro-batched into one pass (cached user states, each user's own edit in one batched
  head pass, one ``[B, D] x [D, I]`` product, the seen/candidate mask, one top-k);
* :mod:`~device_ranker.service.cloud_edits`: edit requests to the cloud (uplink window,
  device summary, deadline), decoding, the prototype cache, validation and fallback,
  and ApplyEdit;
* :mod:`~device_ranker.service.event_log`: one JSON line per RecordEvent (user, arm, item,
  the item's rank under the model the user was served just before, request, bytes);
* :mod:`~device_ranker.service.state`: the durable state (``config.state_path``): every
  event is committed to a local SQLite file before RecordEvent acknowledges it (with the
  harm guard's evidence when the click was scored), every installed edit is written with
  its payloads (and an edit a guard holds out, as the candidate), with the guard
  decision's device-wide counts in the same transaction (restored at start; counted only
  once stored: a cloud edit the file refuses is undone and its request fails); users
  evicted from memory (least recently used beyond ``config.max_users`` or
  ``config.max_memory_mb`` of estimated user state, :mod:`~device_ranker.service.memory`)
  or lost in a restart are reloaded from it on their next call.

Per event, the user's gate (:mod:`device_ranker.gate`, or the arm's gate or timer,
:mod:`device_ranker.service.policy`) decides whether to ask the cloud; the optional
staleness rule (:func:`~device_ranker.service.policy.stale_reason`, off by default) may
add a request when the current edit is too old or no longer fits. Before the event is
appended, the clicked item's rank under the model the user is served is recorded (the
fit signal: from the scores of the Recommend that preceded the click; a click no
ranking preceded is skipped, or ranked with one scoring pass with ``fit_every_click``), and
the user state before it goes into the user's ring buffer of recent states when the device
uplinks them (``CloudLinkConfig.uplink_states``). When the cloud is slow, down or sends a
bad edit, the user keeps the last good edit (or the base model) and the response says so
(``mode``/``note``).

**Harm guard** (issue 15; ``config.guard`` / ``config.guard_report``): before a click of
a user who holds a candidate edit (served, or held out by a guard) is appended, the
clicked item's rank under the base head and under the candidate edit is computed (two
probe jobs in one pass on the ranking thread, outside Recommend's micro-batching
window: one head pass and catalogue product each, no per-item Python) and recorded in
the user's evidence (:class:`device_ranker.guard.GuardState` + cumulative sums reported
to the cloud); a new
edit then passes the device's harm test and the cloud's fleet decision
(:mod:`~device_ranker.service.cloud_edits`) or is held. The learned trigger
(``config.trigger == "learned"``, :mod:`~device_ranker.service.learned_trigger`) reads
the base ranks of the clicks, computed in the same pass.

Evaluation probes: a Recommend may name probe items; their scores and their ranks among
the rankable items (ties pessimistic, :func:`recsys.metrics.target_ranks`) come back from
the same pass, so a replay through gRPC measures exactly what the in-process replay does.

Shapes: B users in a batch, D model width, I catalogue items, K top-k, P probes.

Example::

    engine = DeviceEngine.load(DeviceConfig(checkpoint="ranker.pt", dataset="ml-100k"))
    await engine.start()
    rec = await engine.recommend("u1", 10)              # Recommendation
    res = await engine.record_event("u1", "i42", 1700000000, wait_for_edit=True)
    await engine.close()
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from device_ranker.edits import EditBounds
from device_ranker.gate import GateDecision
from device_ranker.guard import HarmGuard
from device_ranker.ranker import Ranker
from device_ranker.service.cloud_edits import CloudEdits, FetchResult, GuardCounts, ServedEdits
from device_ranker.service.cloud_link import CloudLink
from device_ranker.service.config import DeviceConfig
from device_ranker.service.event_log import EventLog
from device_ranker.service.learned_trigger import LearnedTrigger
from device_ranker.service.policy import ArmResolver, stale_reason
from device_ranker.service.ranking import Ranking
from device_ranker.service.state import DeviceStateStore
from device_ranker.service.users import (
    BASE,
    EditInfo,
    UserState,
    UserStore,
    check_id,
    serving_mode,
)
from recsys.errors import RecsysError, ValidationError
from recsys.serving.errors import NotReadyError
from recsys.serving.fingerprint import file_fingerprint
from recsys.serving.redact import id_ref

logger = logging.getLogger(__name__)

_REQUESTED = ("pending", "applied", "failed", "held")  # outcomes of a request that was sent


@dataclass(frozen=True)
class Recommendation:
    """A ranked list and how it was made."""

    item_ids: list[str]
    scores: list[float]
    mode: str
    edit: EditInfo | None
    note: str = ""
    probe_scores: list[float] = field(default_factory=list)
    probe_ranks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class EventResult:
    """What RecordEvent (or RequestEdit) did."""

    history_length: int
    shift_score: float
    threshold: float
    requested: bool
    outcome: str  # not_requested, pending, applied, held, failed, in_flight
    mode: str
    edit: EditInfo | None
    new_user: bool
    cost: FetchResult | None = None  # the edit request this call made and waited for
    arm: str = ""


def click_rank(scores: torch.Tensor, item: int, seen: set[int]) -> int:
    """1-based rank of ``item`` from full-catalogue scores [I], among the items not in
    ``seen`` (the item always counts itself: ties pessimistic, as
    :func:`device_ranker.service.ranking.probe_ranks`)."""
    above = scores >= scores[item]  # [I]
    if seen:
        idx = torch.from_numpy(np.fromiter(seen, np.int64, len(seen)))
        above[idx] = False
    return int(above.sum()) + int(item in seen)


class DeviceEngine:
    """Users, ranking and edits of one device server (see the module docstring).

    Args:
        ranker: the loaded ranker (its bounds are the device's edit bounds).
        config: :class:`DeviceConfig`.
        model_version: fingerprint of the ranker sent with edit requests.
        link: the cloud client (None = no cloud; users stay on the base model).
        arm_for: the experiment's arm resolver (None = no experiment: every user follows
            ``config.gate``); see :mod:`device_ranker.service.policy`.
        event_log: where every RecordEvent is logged (None = no log).
        state: the durable device state (None = in memory only).
    """

    def __init__(
        self,
        ranker: Ranker,
        config: DeviceConfig,
        *,
        model_version: str = "",
        link: CloudLink | None = None,
        arm_for: ArmResolver | None = None,
        event_log: EventLog | None = None,
        state: DeviceStateStore | None = None,
    ) -> None:
        if ranker.item_ids is None:
            raise ValidationError("the device ranker must know its item ids (checkpoint item_ids)")
        self.ranker = ranker
        self.config = config
        self.model_version = model_version
        self.link = link
        item_vectors = ranker.model.item_table.detach().numpy()  # [I, D]
        self.store = UserStore(ranker.item_ids, config, item_vectors, arm_for)
        self.users = self.store.users  # user id -> UserState
        self.item_ids, self.item_index = self.store.item_ids, self.store.item_index
        self.event_log = event_log
        self.ranking = Ranking(ranker, config.rank_batch, inline=config.rank_inline)
        self.batcher = self.ranking.batcher
        self.edits = CloudEdits(
            ranker,
            link,
            config.cloud,
            model_version,
            self.item_ids,
            self.ranking.executor,
            guard=HarmGuard(config.guard_settings) if config.guard else None,
            report_evidence=config.guard_report,
        )
        self.state = state
        if state is not None:
            self.store.durable = state
            self.store.restore_edit = self._restore_edit
            self.edits.on_install = self._persist_edit  # a failure undoes the install
            self.edits._push_counter = state.max_pushed_edit_id()  # pushed ids keep rising
            self.edits.counts = GuardCounts.from_stored(state.counters())  # as before a restart
        self.served: Counter[str] = Counter()  # Recommend answers by mode (metrics)
        self.ready = False

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, config: DeviceConfig, *, arm_for: ArmResolver | None = None) -> DeviceEngine:
        """Load the ranker (with the configured bounds), seed users from the dataset; open
        the event log when configured (``arm_for``: see the class)."""
        torch.set_num_threads(config.torch_threads)
        bounds = EditBounds()  # the ranker's defaults, overridden where configured
        if config.max_weight_norm is not None:
            bounds = replace(bounds, max_weight_norm=config.max_weight_norm)
        if config.max_bias_abs is not None:
            bounds = replace(bounds, max_bias_abs=config.max_bias_abs)
        t0 = time.perf_counter()
        ranker = Ranker.from_checkpoint(config.checkpoint, bounds=bounds, ann=config.ann)
        link = CloudLink(config.cloud) if config.cloud.target else None
        log = EventLog(config.event_log, config.experiment) if config.event_log else None
        state = None
        if config.state_path:
            state = DeviceStateStore(config.state_path, sync=config.state_sync)
        engine = cls(
            ranker,
            config,
            model_version=file_fingerprint(config.checkpoint),
            link=link,
            arm_for=arm_for,
            event_log=log,
            state=state,
        )
        if config.dataset and config.seed_histories != "none":
            engine.seed_from_dataset()
        logger.info(
            "device ready: ranker %s (%d items), %d users in memory, %s, %.1f s",
            engine.model_version,
            ranker.num_items,
            len(engine.users),
            f"{state.num_users()} users in {state.path}" if state else "no durable state",
            time.perf_counter() - t0,
        )
        return engine

    def seed_from_dataset(self) -> int:
        """Give every user of the dataset its (training-period) history; returns users."""
        return self.store.seed_from_dataset()

    async def start(self) -> None:
        """Start the cloud link (probing); the engine is then ready."""
        if self.link is not None:
            await self.link.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        pending = [st.pending for st in self.users.values() if st.pending is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.batcher.close()
        if self.link is not None:
            await self.link.close()
        self.ranking.executor.shutdown(wait=True)
        if self.event_log is not None:
            self.event_log.close()
        if self.state is not None:
            logger.info("device state closed: %s, %d users evicted, %d reloaded",
                        self.state.stats(), self.store.evicted, self.store.reloaded)  # fmt: skip
            self.state.close()

    # ---- lookups ----------------------------------------------------------------------------
    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReadyError("the device ranker is still loading; retry shortly")

    def user(self, user_id: str) -> UserState:
        return self.store.user(user_id)

    def item(self, item_id: str) -> int:
        return self.store.item(item_id)

    def mode(self, st: UserState) -> tuple[str, str]:
        """(serving mode, note) of a user right now."""
        return serving_mode(st, self.store.adaptive(st), self.link)

    # ---- Recommend ----------------------------------------------------------------------------
    async def recommend(
        self,
        user_id: str,
        k: int,
        *,
        candidates: Sequence[str] | None = None,
        include_seen: bool = False,
        base_model: bool = False,
        probes: Sequence[str] | None = None,
    ) -> Recommendation:
        """Top-``k`` for a user (validated; see the proto for the limits), plus the scores
        and ranks of the ``probes`` (evaluation) under the same model and exclusions."""
        self._require_ready()
        cfg = self.config
        if not 1 <= k <= cfg.max_k:
            raise ValidationError(f"k must be in 1..{cfg.max_k}, got {k}")
        st = self.user(user_id)
        cand = self.store.candidate_indices(candidates) if candidates is not None else None
        probe_idx = self.store.probe_indices(probes) if probes else None
        await self.store.ensure_arm(st, user_id)
        base_model = base_model or not self.store.adaptive(st)
        edit = None if base_model else st.edit
        # the mode and edit reported are those of the pass: read before it, as a
        # background edit request may install (or fail) while the pass runs
        if base_model:
            mode, note, info = BASE, "", None
        else:
            mode, note = self.mode(st)
            info = st.edit_info if edit is not None else None
        out = await self.ranking.rank(
            st,
            edit=edit,
            k=k,
            exclude=None if include_seen else st.seen,
            candidates=cand,
            probes=probe_idx,
            keep_scores=self.config.staleness.fit_clicks > 0,
        )
        self.store.account(st)  # the pass may have cached the state [D] and scores [I]
        self.served[mode] += 1
        return Recommendation(
            item_ids=[self.item_ids[i] for i in out.items],
            scores=out.scores,
            mode=mode,
            edit=info,
            note=note,
            probe_scores=out.probe_scores,
            probe_ranks=out.probe_ranks,
        )

    # ---- RecordEvent -----------------------------------------------------------------------
    async def record_event(
        self, user_id: str, item_id: str, timestamp: int, *, wait_for_edit: bool = False
    ) -> EventResult:
        """Append the event, run the user's gate, maybe ask the cloud for an edit; with an
        event log, write the event's line (the item's rank is taken before the append)."""
        self._require_ready()
        check_id("user_id", user_id)
        item = self.item(item_id)
        if timestamp < 0:
            raise ValidationError(f"timestamp must be >= 0 (unix seconds), got {timestamp}")
        st = self.store.get(user_id)
        new_user = st is None
        if st is None:
            st = self.store.new_user(user_id)
            logger.info("new user %s", id_ref(user_id))
        async with st.lock:
            await self.store.ensure_arm(st, user_id)
            served = await self._served_rank(st, item) if self.event_log is not None else None
            await self._before_append(st, item, None if served is None else served[0])
            saved = st.guard.saved() if st.guard is not None else None
            base_rank, scored = await self._guard_click(st, item)
            try:  # before it is acknowledged; with the evidence the click added
                self._persist_event(user_id, st, item_id, timestamp, evidence=scored)
            except RecsysError:
                if scored and st.guard is not None and saved is not None:
                    st.guard.restore(saved)  # not durable: not recorded either
                raise
            st.append(item, timestamp)
            if st.base_ranks is not None:
                st.base_ranks.append(float("nan") if base_rank is None else float(base_rank))
            history = list(st.history)
            _, gate = self.store.arm_policy(st)
            if gate is None:  # a static arm: never asks
                decision = GateDecision(False, 0.0, float("inf"), "static")
            elif isinstance(gate, LearnedTrigger):
                ranks = st.base_ranks if st.base_ranks is not None else ()
                decision = self._stale(st, gate, gate.decide(history, st.gate, ranks))
            else:
                decision = self._stale(st, gate, gate.decide(history, st.gate))
            outcome, fetched, task = "not_requested", FetchResult("not_requested"), None
            if decision.request and gate is not None:
                outcome, fetched, task = await self.edits.request(user_id, st, gate, wait_for_edit)
        self.store.account(st)  # the cap is checked with the user unlocked: others go first
        mode, _ = self.mode(st)
        requested = decision.request and outcome in _REQUESTED
        if served is not None:
            line = {
                "user_id": user_id,
                "arm": st.arm or "",
                "timestamp": int(timestamp),
                "item_id": item_id,
                "rank": served[0],
                "num_items": served[1],
                "history_len": len(history) - 1,
                "requested": requested,
            }
            if outcome == "pending" and task is not None:
                task.add_done_callback(lambda t, line=line: self._log_fetched(line, t))
            else:
                cost = fetched if requested else FetchResult(outcome)
                self.event_log.write_event(line, cost, mode)  # type: ignore[union-attr]
        return self._event_result(st, decision, outcome, fetched, mode, new_user)

    async def request_edit(self, user_id: str, *, wait_for_edit: bool = False) -> EventResult:
        """Ask the cloud for the user's edit now, bypassing the gate (its anchor becomes
        the current window). Not for static arms or without a cloud ("not_requested")."""
        self._require_ready()
        st = self.user(user_id)
        await self.store.ensure_arm(st, user_id)
        _, gate = self.store.arm_policy(st)
        outcome, fetched = "not_requested", FetchResult("not_requested")
        if gate is not None:
            outcome, fetched, _ = await self.edits.request(user_id, st, gate, wait_for_edit)
        threshold = gate.threshold() if gate is not None else float("inf")
        forced = GateDecision(True, st.gate.last_score, threshold, "forced")
        return self._event_result(st, forced, outcome, fetched, self.mode(st)[0], False)

    @staticmethod
    def _event_result(
        st: UserState,
        decision: GateDecision,
        outcome: str,
        fetched: FetchResult,
        mode: str,
        new_user: bool,
    ) -> EventResult:
        return EventResult(
            history_length=len(st.history),
            shift_score=decision.score,
            threshold=decision.threshold,
            requested=decision.request and outcome in _REQUESTED,
            outcome=outcome,
            mode=mode,
            edit=st.edit_info,
            new_user=new_user,
            cost=fetched if fetched.outcome in ("applied", "failed", "held") else None,
            arm=st.arm or "",
        )

    async def _before_append(self, st: UserState, item: int, served: int | None) -> None:
        """Before an event is appended: the clicked item's rank under the model the user
        is served (the fit signal; ``served``: already ranked for the event log) and the
        user state before it (the ring buffer of recent states)."""
        cfg = self.config.staleness
        if cfg.fit_clicks > 0:
            rank = served if served is not None else await self._click_rank(st, item)
            if rank is not None:
                st.staleness.ranks.append(int(rank))
        if st.past_states.maxlen and st.history:
            state = st.state if st.state_version == st.version else None
            if state is not None:  # free when a ranking pass cached it; else computed later
                st.past_states.append((st.position, state))

    async def _guard_click(self, st: UserState, item: int) -> tuple[int | None, bool]:
        """Before a click is appended: its rank under the base head (when the guard
        scores clicks and the user holds a candidate edit, or the learned trigger needs
        it) and under the candidate edit (recorded in the user's guard evidence), from
        one pass on the ranking thread; returns (the base rank or None: not ranked,
        whether the evidence recorded the click)."""
        scores = st.guard is not None and st.guard.clicks is not None
        candidate = st.shadow_edit if scores else None
        if candidate is not None and not self.store.adaptive(st):
            candidate = None  # a static arm is served the base head: nothing to judge
        if candidate is None and st.base_ranks is None:
            return None, False
        edits = [None] if candidate is None else [None, candidate]
        ranks = await self.ranking.probe_ranks(st, edits, item)  # one pass, no batch wait
        base_rank = ranks[0]
        if candidate is not None:
            st.guard.record(base_rank, ranks[1])  # type: ignore[union-attr]
        return base_rank, candidate is not None

    async def _click_rank(self, st: UserState, item: int) -> int | None:
        """Rank of ``item`` among the catalogue minus the user's history under the model
        the user is served now (ties pessimistic, as the probes of Recommend): from the
        scores of the user's last ranking when they are for this history and this edit
        (no pass), else one scoring pass with ``fit_every_click`` (None without)."""
        edit = st.edit if self.store.adaptive(st) else None
        cached = st.scores
        if cached is None or cached[0] != st.version or cached[1] is not edit:
            if not self.config.staleness.fit_every_click:
                return None
            out = await self.ranking.rank(
                st,
                edit=edit,
                k=0,
                exclude=st.seen,
                probes=np.asarray([item], dtype=np.int64),
                keep_scores=True,
            )
            return int(out.probe_ranks[0])
        return click_rank(cached[2], item, st.seen)

    def _stale(self, st: UserState, gate: Any, decision: GateDecision) -> GateDecision:
        """The gate's decision, or a request when the staleness rule says the current
        edit is stale (only after the first request and outside the gate's min_gap)."""
        cfg = self.config.staleness
        if decision.request or not cfg.rule_on or st.gate.anchor is None:
            return decision
        if decision.reason == "short" or st.gate.events_since_request < gate.config.min_gap:
            return decision
        why = stale_reason(cfg, st.staleness, st.times[-1] if st.times else None)
        if why is None:
            return decision
        return GateDecision(True, decision.score, decision.threshold, why)

    async def _served_rank(self, st: UserState, item: int) -> tuple[int, int]:
        """(rank of ``item`` under the model the user is served now, rankable items):
        the catalogue minus the user's history, the user's edit unless the arm is static."""
        out = await self.ranking.rank(
            st,
            edit=st.edit if self.store.adaptive(st) else None,
            k=0,
            exclude=st.seen,
            probes=np.asarray([item], dtype=np.int64),
        )
        return int(out.probe_ranks[0]), int(out.rankable)

    def _log_fetched(self, line: dict[str, Any], task: asyncio.Task[FetchResult]) -> None:
        """Done-callback of a background edit request: log its event with the bytes."""
        if task.cancelled() or task.exception() is not None:
            fetched = FetchResult("failed")
        else:
            fetched = task.result()
        st = self.users.get(line["user_id"])
        mode = self.mode(st)[0] if st is not None else BASE
        assert self.event_log is not None
        self.event_log.write_event(line, fetched, mode)

    # ---- durable state ------------------------------------------------------------------------
    def _persist_event(
        self, user_id: str, st: UserState, item_id: str, timestamp: int, *, evidence: bool
    ) -> None:
        """Commit the event to the durable state (with the user's snapshot first when the
        state does not hold the user yet, or every ``history_len`` events to compact;
        with the user's guard evidence when ``evidence``: the click was scored);
        StateWriteError (UNAVAILABLE) leaves the user unchanged."""
        if self.state is None:
            return
        snapshot = None
        if not st.durable or st.since_snapshot >= self.config.history_len:
            snapshot = self.store.snapshot(st)
        stored = st.guard.stored_evidence() if evidence and st.guard is not None else None
        self.state.record_event(
            user_id, st.position + 1, item_id, timestamp, snapshot=snapshot, evidence=stored
        )
        st.durable = True
        st.since_snapshot = 1 if snapshot is not None else st.since_snapshot + 1

    def _persist_edit(
        self, user_id: str, st: UserState, counts: Mapping[str, int] | None = None
    ) -> None:
        """Write the user's active edit (or its revert) to the durable state, with its
        guard state (a held candidate, or none any more, and the evidence) and, in the
        same transaction, the guard decision's counter increments (``counts``);
        StateWriteError when the file refuses it (the edit, guard and counter rows are
        not written; a first snapshot of a user not yet durable, committed before in its
        own transaction, stays: it holds the user's history, not the edit)."""
        if self.state is None:
            return
        self.store.make_durable(user_id, st)
        info = None
        if st.edit is not None and st.edit_info is not None:
            info = {**dataclasses.asdict(st.edit_info), "model_version": self.model_version}
        guard = st.guard.stored(self.model_version) if st.guard is not None else None
        self.state.write_edit(user_id, st.edit_payload, st.proto_payload, info, guard, counts)

    def _restore_edit(
        self, payload: bytes, proto_payload: bytes | None, info: dict[str, Any]
    ) -> Any:
        """A stored edit, prepared again (its prototype put back in the cache)."""
        if info.get("model_version") != self.model_version:
            raise ValidationError(
                f"stored for ranker {info.get('model_version')}, this is {self.model_version}"
            )
        proto = None
        pid, pver = int(info.get("prototype_id", 0)), int(info.get("prototype_version", 0))
        if pid:  # a residual: its prototype's edit was stored beside it
            if proto_payload is None:
                raise ValidationError(f"the payload of prototype {pid} v{pver} was not stored")
            proto = self.edits._decode_edit(proto_payload, False)
            self.edits.cache_prototype((pid, pver), proto, proto_payload)
        return self.edits._build_edit(payload, proto)

    # ---- ApplyEdit -----------------------------------------------------------------------------
    async def apply_edit(
        self, user_id: str, payload: bytes, source: str = "push"
    ) -> tuple[EditInfo | None, str]:
        """Install a pushed edit for a user (empty payload = revert); returns (edit, mode)."""
        self._require_ready()
        st = self.user(user_id)
        pushed = await self.edits.prepare_pushed(payload, source)  # decoded and validated
        # no await from here to the restore: an edit request of the same user cannot land
        # between the snapshot and the install (a restore would then drop its edit)
        before = ServedEdits.of(st)
        st.install_edit(*pushed)
        try:
            self._persist_edit(user_id, st)
        except RecsysError:  # not durable: not applied either (UNAVAILABLE, retry)
            before.restore(st)  # the edit, a candidate a guard held, the staleness clock
            raise
        return st.edit_info, self.mode(st)[0]

    # ---- status -------------------------------------------------------------------------------
    async def status(self, user_id: str | None = None) -> dict[str, Any]:
        """Device-wide figures, plus one user's state (and arm) when ``user_id`` is given."""
        out: dict[str, Any] = {
            "ready": self.ready,
            "cloud_reachable": bool(self.link is not None and self.link.reachable),
            "cloud_target": self.config.cloud.target or "",
            "model_version": self.model_version,
            "num_items": self.ranker.num_items,
            "num_users": len(self.users),
            "users_with_edit": sum(st.edit is not None for st in self.users.values()),
            "edit_requests": self.edits.requests,
            "edit_failures": self.edits.failures,
            "bytes_up": self.edits.bytes_up,
            "bytes_down": self.edits.bytes_down,
            "gate_threshold": self.store.gate.threshold(),
            "gate_budget": self.store.gate.config.budget,
            "last_cloud_ok_ms": self.link.last_ok_ms if self.link is not None else 0,
            "experiment": self.config.experiment or "",
            "max_users": self.store.max_users,
            "memory_bytes": self.store.bytes_held,
            "max_memory_bytes": self.store.max_bytes or 0,
            "users_evicted": self.store.evicted,
            "evicted_bytes": self.store.evicted_bytes,
            "users_reloaded": self.store.reloaded,
            # durable with a state file (restored at start; counted once stored)
            **dataclasses.asdict(self.edits.counts),
            "user": None,
            "durability": {
                "users_in_memory": len(self.users),
                "max_users": self.store.max_users,
                "memory_bytes": self.store.bytes_held,
                "max_memory_bytes": self.store.max_bytes,
                "evicted": self.store.evicted,
                "reloaded": self.store.reloaded,
                **(self.state.stats() if self.state is not None else {"path": None}),
            },
        }
        if user_id:
            st = self.user(user_id)
            await self.store.ensure_arm(st, user_id)
            out["user"] = self.store.user_status(user_id, st, self.link)
        return out
