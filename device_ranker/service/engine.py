"""The device's serving logic, independent of gRPC: users, ranking, the gate, edits.

:class:`DeviceEngine` holds one :class:`~device_ranker.ranker.Ranker` (frozen embeddings
and encoder, shared) and, per user ("device"), a bounded recent history, the set of seen
items, the cached user state, the active edit and the request-gate state. The servicer
(:mod:`device_ranker.service.servicer`) only translates protos to these calls.

Ranking: Recommend calls are micro-batched (:class:`recsys.serving.batching.MicroBatcher`)
into one pass on a dedicated torch thread. The user state ``[D]`` depends only on the
history, so it is computed once per history change and cached; a Recommend then costs
the head (with the user's own edit, per-user weights in one batched pass), one
``[B, D] x [D, I]`` product, the seen/candidate mask and a top-k.

Edits: after each event the gate (:mod:`device_ranker.gate`) decides whether to ask the
cloud; the request carries the user's recent item ids (+ a summary vector) and a
deadline. The answer (an RSE1 payload: residual + prototype reference) is decoded,
composed with the prototype edit (cached per version; fetched when missing), validated
against the device's bounds and made the user's active edit. When the cloud is slow,
down or sends a bad edit, the user keeps the last good edit (or the base model), the
response says so (``mode``/``note``) and the log has a warning.

Evaluation probes: a Recommend may name probe items; their scores and their ranks among
the rankable items (ties pessimistic, :func:`recsys.metrics.target_ranks`) come back from
the same pass, so a replay through gRPC measures exactly what the in-process replay does.

Experiments (live A/B traffic): with an injected arm resolver
(:data:`device_ranker.service.policy.ArmResolver`), each user's arm decides whether the
device adapts (a static arm never asks the cloud) and with which trigger and budget
(one gate per arm); with an :class:`~device_ranker.service.event_log.EventLog`, every
RecordEvent writes one JSON line (user, arm, item, the item's rank under the model the
user was served just before, request, bytes).

Shapes: B users in a batch, D model width, I catalogue items, K top-k, P probes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import grpc.aio
import numpy as np
import torch

from device_ranker.edits import EditBounds, HeadEdit, PreparedEdit
from device_ranker.features import history_kjt
from device_ranker.gate import GateDecision, GateState, ShiftGate
from device_ranker.ranker import Ranker
from device_ranker.service.cloud_link import CloudLink
from device_ranker.service.config import DeviceConfig
from device_ranker.service.event_log import EventLog
from device_ranker.service.policy import ArmPolicy, ArmResolver, TimerGate
from device_ranker.service.ranking import RankJob, RankOutput, rank_batch
from recsys.edit_payload import decode_payload
from recsys.errors import NotFoundError, RecsysError, ValidationError
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.serving.batching import MicroBatcher
from recsys.serving.errors import NotReadyError
from recsys.serving.fingerprint import file_fingerprint

logger = logging.getLogger(__name__)

MAX_ID_LEN = 200
PROTOTYPE_CACHE = 256  # prototype versions kept on the device (LRU)
_DTYPE_ENUM = {
    "fp16": cpb.PAYLOAD_DTYPE_FP16,
    "int8": cpb.PAYLOAD_DTYPE_INT8,
    "fp32": cpb.PAYLOAD_DTYPE_FP32,
}

# serving modes (the servicer maps them to the proto enum)
BASE = "base"
EDITED = "edited"
FALLBACK_LAST_EDIT = "fallback_last_edit"
FALLBACK_BASE = "fallback_base"


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """(fn(*args), its wall time in us): the device's compute, measured where it runs."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t0) * 1e6


def check_id(what: str, value: str) -> str:
    """A non-empty id of at most :data:`MAX_ID_LEN` characters."""
    if not value:
        raise ValidationError(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LEN:
        raise ValidationError(f"{what} is {len(value)} characters long; the limit is {MAX_ID_LEN}")
    return value


def device_summary(ranker: Ranker, history: Sequence[int], summary_items: int) -> list[float]:
    """The uplink summary [2D]: [mean item embedding of the last ``summary_items`` items,
    the ranker's user state] (what the adaptor was trained to read)."""
    model = ranker.model
    table = model.item_table.detach()  # [I, D]
    recent = torch.as_tensor(list(history)[-summary_items:], dtype=torch.int64)
    with torch.inference_mode():
        pooled = table[recent].mean(0) if len(recent) else torch.zeros(table.shape[1])  # [D]
        state = model.user_states(history_kjt([np.asarray(history, np.int64)], model.cfg.max_len))[
            0
        ]  # [D]
        return torch.cat([pooled, state]).tolist()


@dataclass(frozen=True)
class EditInfo:
    """What the active edit of a user is (reported in responses and the status)."""

    edit_id: int
    prototype_id: int = 0
    prototype_version: int = 0
    source: str = "cloud"
    payload_bytes: int = 0
    applied_at_ms: int = 0


@dataclass
class UserState:
    """One device's state (mutated on the event loop only)."""

    history: deque[int]
    times: deque[int]
    seen: set[int] = field(default_factory=set)
    gate: GateState = field(default_factory=GateState)
    version: int = 0  # bumps with every event; the cached state belongs to `state_version`
    state: torch.Tensor | None = None  # [D] user state for the current history
    state_version: int = -1
    edit: PreparedEdit | None = None
    edit_info: EditInfo | None = None
    failed: bool = False  # the last edit request failed
    note: str = ""
    pending: asyncio.Task[FetchResult] | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    arm: str | None = None  # experiment arm (None = not resolved yet; "" = no experiment)
    # orders one user's concurrent RecordEvents: rank-for-the-log, append, gate, request
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class FetchResult:
    """One edit request: "applied" or "failed", and what it cost (the proto's EditCost).

    Attributes:
        bytes_up / bytes_down: serialized GenerateEdit request / response (+ GetPrototype).
        payload_bytes: the residual's RSE1 payload; prototype_bytes: a prototype payload
            received for it (0 when the device held it).
        cloud_ms: the cloud engine's time.
        decode_us / apply_us: device compute on the ranking thread: RSE1 -> tensors, then
            compose + validate + materialise the head weights.
    """

    outcome: str
    bytes_up: int = 0
    bytes_down: int = 0
    payload_bytes: int = 0
    prototype_bytes: int = 0
    cloud_ms: float = 0.0
    decode_us: float = 0.0
    apply_us: float = 0.0


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
    """What RecordEvent did."""

    history_length: int
    shift_score: float
    threshold: float
    requested: bool
    outcome: str  # not_requested, pending, applied, failed, in_flight
    mode: str
    edit: EditInfo | None
    new_user: bool
    cost: FetchResult | None = None  # the edit request this call made and waited for
    arm: str = ""


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
    ) -> None:
        if ranker.item_ids is None:
            raise ValidationError("the device ranker must know its item ids (checkpoint item_ids)")
        self.ranker = ranker
        self.config = config
        self.model_version = model_version
        self.link = link
        self.item_ids: list[str] = list(ranker.item_ids)
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.users: dict[str, UserState] = {}
        self.item_vectors = ranker.model.item_table.detach().numpy()  # [I, D]
        self.gate: ShiftGate | TimerGate = (
            TimerGate(config.gate)
            if config.trigger == "timer"
            else ShiftGate(config.gate, item_vectors=self.item_vectors)
        )
        self.arm_for = arm_for
        self.event_log = event_log
        # arm name -> (its policy, its gate: None for a static arm)
        self._arms: dict[str, tuple[ArmPolicy, ShiftGate | TimerGate | None]] = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ranker")
        self.batcher: MicroBatcher[RankJob, RankOutput] = MicroBatcher(
            self._rank_batch,
            config.rank_batch,
            name="recommend",
            executor=self.executor,
            inline=config.rank_inline,
        )
        self._prototypes: OrderedDict[tuple[int, int], HeadEdit] = OrderedDict()
        self.ready = False
        self.edit_requests = 0
        self.edit_failures = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._push_counter = 0

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
        ranker = Ranker.from_checkpoint(config.checkpoint, bounds=bounds)
        link = CloudLink(config.cloud) if config.cloud.target else None
        log = EventLog(config.event_log, config.experiment) if config.event_log else None
        engine = cls(
            ranker,
            config,
            model_version=file_fingerprint(config.checkpoint),
            link=link,
            arm_for=arm_for,
            event_log=log,
        )
        if config.dataset and config.seed_histories != "none":
            engine.seed_from_dataset()
        logger.info(
            "device ready: ranker %s (%d items), %d users seeded, %.1f s",
            engine.model_version,
            ranker.num_items,
            len(engine.users),
            time.perf_counter() - t0,
        )
        return engine

    def seed_from_dataset(self) -> int:
        """Give every user of the dataset its (training-period) history; returns users."""
        from recsys.data import time_split
        from recsys.data.registry import load_dataset

        cfg = self.config
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
        rows = (
            time_split(ds, quantile=cfg.seed_quantile).train
            if cfg.seed_histories == "time"
            else np.arange(len(ds.interactions))
        )
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        ds_items = [str(i) for i in ds.item_ids]
        if ds_items == self.item_ids:
            to_ranker = np.arange(len(ds_items), dtype=np.int64)
        else:
            to_ranker = np.asarray([self.item_index.get(i, -1) for i in ds_items], dtype=np.int64)
        users, items = ds.user_index[rows], to_ranker[ds.item_index[rows]]
        times, user_ids = ds.timestamps[rows], [str(u) for u in ds.user_ids]
        for u, i, t in zip(users.tolist(), items.tolist(), times.tolist(), strict=True):
            if i < 0:
                continue
            st = self.users.get(user_ids[u])
            if st is None:
                st = self._new_user(user_ids[u])
            st.history.append(i)
            st.times.append(int(t))
            st.seen.add(i)
        return len(self.users)

    def _new_user(self, user_id: str) -> UserState:
        n = self.config.history_len
        st = UserState(history=deque(maxlen=n), times=deque(maxlen=n))
        self.users[user_id] = st
        return st

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
        self.executor.shutdown(wait=True)
        if self.event_log is not None:
            self.event_log.close()

    # ---- lookups ----------------------------------------------------------------------------
    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReadyError("the device ranker is still loading; retry shortly")

    def user(self, user_id: str) -> UserState:
        st = self.users.get(check_id("user_id", user_id))
        if st is None:
            raise NotFoundError(
                f"unknown user {user_id!r}: the device has no state for it; record an event "
                "first (RecordEvent creates the user)"
            )
        return st

    def item(self, item_id: str) -> int:
        idx = self.item_index.get(check_id("item_id", item_id))
        if idx is None:
            raise NotFoundError(f"unknown item {item_id!r}: not in the ranker's catalogue")
        return idx

    # ---- arms ------------------------------------------------------------------------------
    async def ensure_arm(self, st: UserState, user_id: str) -> None:
        """Resolve the user's arm once (the resolver may block: a worker thread)."""
        if st.arm is not None:
            return
        if self.arm_for is None:
            st.arm = ""
            return
        name, policy = await asyncio.to_thread(self.arm_for, user_id)
        name = str(name)
        if name not in self._arms:
            arm = ArmPolicy.from_dict(policy)
            self._arms[name] = (arm, arm.make_gate(self.config.gate, self.item_vectors))
            logger.info("arm %r: %s", name, arm)
        st.arm = name

    def arm_policy(self, st: UserState) -> tuple[ArmPolicy | None, ShiftGate | TimerGate | None]:
        """(the user's arm policy or None without an experiment, the gate it uses or None
        when the user never asks the cloud)."""
        if st.arm:
            return self._arms[st.arm]
        return None, self.gate

    def adaptive(self, st: UserState) -> bool:
        policy, _ = self.arm_policy(st)
        return policy is None or policy.adaptive

    def mode(self, st: UserState) -> tuple[str, str]:
        """(serving mode, note) of a user right now."""
        if not self.adaptive(st):
            return BASE, ""
        cloud_down = self.link is not None and not self.link.reachable
        if st.failed or cloud_down:
            note = st.note if st.failed else f"cloud unreachable ({self.link.last_error})"
            return (FALLBACK_LAST_EDIT if st.edit is not None else FALLBACK_BASE), note
        return (EDITED if st.edit is not None else BASE), ""

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
        cand = None
        if candidates is not None:
            if len(candidates) == 0:
                raise ValidationError(
                    "the candidate list is empty; leave `candidates` unset to rank the whole catalogue"
                )
            if len(candidates) > cfg.max_candidates:
                raise ValidationError(
                    f"{len(candidates)} candidates; the limit is {cfg.max_candidates}"
                )
            cand = np.unique(np.fromiter((self.item(c) for c in candidates), np.int64))
        probe_idx = self._probe_indices(probes) if probes else None
        await self.ensure_arm(st, user_id)
        base_model = base_model or not self.adaptive(st)
        edit = None if base_model else st.edit
        version = st.version
        job = RankJob(
            history=np.fromiter(st.history, np.int64, len(st.history)),
            state=st.state if st.state_version == version else None,
            edit=edit,
            k=k,
            exclude=None if include_seen else np.fromiter(st.seen, np.int64, len(st.seen)),
            candidates=cand,
            probes=probe_idx,
        )
        out = await self.batcher.submit(job)
        if st.version == version and st.state_version != version:
            st.state, st.state_version = out.state, version
        if base_model:
            mode, note, info = BASE, "", None
        else:
            mode, note = self.mode(st)
            info = st.edit_info if edit is not None else None
        return Recommendation(
            item_ids=[self.item_ids[i] for i in out.items],
            scores=out.scores,
            mode=mode,
            edit=info,
            note=note,
            probe_scores=out.probe_scores,
            probe_ranks=out.probe_ranks,
        )

    def _probe_indices(self, probes: Sequence[str]) -> np.ndarray:
        """Probe ids -> item indices [P] (unknown or too many: ValidationError)."""
        limit = self.config.max_probes
        if len(probes) > limit:
            raise ValidationError(f"{len(probes)} probe items; the limit is {limit}")
        idx = np.empty(len(probes), dtype=np.int64)
        for n, item in enumerate(probes):
            found = self.item_index.get(item)
            if found is None:
                raise ValidationError(
                    f"unknown probe item {item[:100]!r} (position {n}): probes must be items "
                    "of the ranker's catalogue"
                )
            idx[n] = found
        return idx

    def _rank_batch(self, jobs: list[RankJob]) -> list[RankOutput]:
        """B jobs -> top-k each (runs on the ranking thread)."""
        return rank_batch(self.ranker.model, self.ranker.num_items, jobs)

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
        st = self.users.get(user_id)
        new_user = st is None
        if st is None:
            st = self._new_user(user_id)
            logger.info("new user %r", user_id)
        async with st.lock:
            await self.ensure_arm(st, user_id)
            served = await self._served_rank(st, item) if self.event_log is not None else None
            st.history.append(item)
            st.times.append(int(timestamp))
            st.seen.add(item)
            st.version += 1
            history = list(st.history)
            _, gate = self.arm_policy(st)
            if gate is None:  # a static arm: never asks
                decision = GateDecision(False, 0.0, float("inf"), "static")
            else:
                decision = gate.decide(history, st.gate)
            outcome, fetched, task = "not_requested", FetchResult("not_requested"), None
            if decision.request and gate is not None:
                outcome, fetched, task = await self._request(user_id, st, gate, wait_for_edit)
        mode, _ = self.mode(st)
        requested = decision.request and outcome in ("pending", "applied", "failed")
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
                self._log_event(line, fetched if requested else FetchResult(outcome), mode)
        return EventResult(
            history_length=len(st.history),
            shift_score=decision.score,
            threshold=decision.threshold,
            requested=requested,
            outcome=outcome,
            mode=mode,
            edit=st.edit_info,
            new_user=new_user,
            cost=fetched if fetched.outcome in ("applied", "failed") else None,
            arm=st.arm or "",
        )

    async def request_edit(self, user_id: str, *, wait_for_edit: bool = False) -> EventResult:
        """Ask the cloud for the user's edit now, bypassing the gate (its anchor becomes
        the current window). Not for static arms or without a cloud ("not_requested")."""
        self._require_ready()
        st = self.user(user_id)
        await self.ensure_arm(st, user_id)
        _, gate = self.arm_policy(st)
        outcome, fetched = "not_requested", FetchResult("not_requested")
        if gate is not None:
            outcome, fetched, _ = await self._request(user_id, st, gate, wait_for_edit)
        return EventResult(
            history_length=len(st.history),
            shift_score=st.gate.last_score,
            threshold=gate.threshold() if gate is not None else float("inf"),
            requested=outcome in ("pending", "applied", "failed"),
            outcome=outcome,
            mode=self.mode(st)[0],
            edit=st.edit_info,
            new_user=False,
            cost=fetched if fetched.outcome in ("applied", "failed") else None,
            arm=st.arm or "",
        )

    async def _request(
        self, user_id: str, st: UserState, gate: ShiftGate | TimerGate, wait: bool
    ) -> tuple[str, FetchResult, asyncio.Task[FetchResult] | None]:
        """Send the user's edit request (its current window becomes the gate's anchor):
        (outcome, what it cost when waited for, the task). Without a cloud: not requested;
        with a request already running: in flight."""
        none = FetchResult("not_requested")
        if self.link is None:
            return "not_requested", none, None
        if st.pending is not None and not st.pending.done():
            return "in_flight", none, None
        history = list(st.history)
        previous_anchor = st.gate.anchor
        gate.on_request(history, st.gate)
        task = asyncio.get_running_loop().create_task(
            self._fetch_edit(user_id, st, history, list(st.times), previous_anchor)
        )
        st.pending = task
        if not wait:
            return "pending", none, task
        fetched = await asyncio.shield(task)
        return fetched.outcome, fetched, task

    async def _served_rank(self, st: UserState, item: int) -> tuple[int, int]:
        """(rank of ``item`` under the model the user is served now, rankable items):
        the catalogue minus the user's history, the user's edit unless the arm is static."""
        job = RankJob(
            history=np.fromiter(st.history, np.int64, len(st.history)),
            state=st.state if st.state_version == st.version else None,
            edit=st.edit if self.adaptive(st) else None,
            k=0,
            exclude=np.fromiter(st.seen, np.int64, len(st.seen)),
            candidates=None,
            probes=np.asarray([item], dtype=np.int64),
        )
        version = st.version
        out = await self.batcher.submit(job)
        if st.version == version and st.state_version != version:
            st.state, st.state_version = out.state, version
        return int(out.probe_ranks[0]), int(out.rankable)

    def _log_event(self, line: dict[str, Any], fetched: FetchResult, mode: str) -> None:
        assert self.event_log is not None
        try:
            self.event_log.write(
                {
                    **line,
                    "outcome": fetched.outcome,
                    "bytes_up": fetched.bytes_up,
                    "bytes_down": fetched.bytes_down,
                    "cloud_ms": round(fetched.cloud_ms, 3),
                    "mode": mode,
                }
            )
        except (OSError, ValueError):  # the log must not break serving; say so loudly
            logger.exception("could not write the event log line for user %r", line["user_id"])

    def _log_fetched(self, line: dict[str, Any], task: asyncio.Task[FetchResult]) -> None:
        """Done-callback of a background edit request: log its event with the bytes."""
        if task.cancelled() or task.exception() is not None:
            fetched = FetchResult("failed")
        else:
            fetched = task.result()
        st = self.users.get(line["user_id"])
        mode = self.mode(st)[0] if st is not None else BASE
        self._log_event(line, fetched, mode)

    async def _fetch_edit(
        self,
        user_id: str,
        st: UserState,
        history: list[int],
        times: list[int],
        previous_anchor: Any,
    ) -> FetchResult:
        """Ask the cloud for the user's edit and apply it: "applied" or "failed", with the
        request's bytes up / down (GenerateEdit + a fetched prototype) and cloud time."""
        assert self.link is not None
        link, cfg = self.link, self.config.cloud
        loop = asyncio.get_running_loop()
        self.edit_requests += 1
        t0 = time.perf_counter()
        up = down = payload_bytes = proto_bytes = 0
        cloud_ms = decode_us = apply_us = 0.0
        try:
            if not link.reachable:
                raise ConnectionError(f"cloud unreachable ({link.last_error}); not asked")
            recent = history[-cfg.recent_items :]
            summary: list[float] = []
            if cfg.send_summary:
                summary = await loop.run_in_executor(self.executor, self._summary, history)
            request = cpb.GenerateEditRequest(
                device_id=user_id,
                recent_item_ids=[self.item_ids[i] for i in recent],
                recent_timestamps=times[-len(recent) :],
                summary=summary,
                model_version=self.model_version,
                payload_dtype=_DTYPE_ENUM[cfg.payload_dtype],
            )
            if st.edit_info is not None and st.edit_info.prototype_id:
                request.cached_prototype.id = st.edit_info.prototype_id
                request.cached_prototype.version = st.edit_info.prototype_version
            response, up, down = await link.generate_edit(request)
            cloud_ms = float(response.engine_ms)
            st.bytes_up += up
            st.bytes_down += down
            self.bytes_up += up
            self.bytes_down += down
            proto_edit, proto_bytes, pid, pver = None, 0, 0, 0
            if response.HasField("prototype_ref") and response.prototype_ref.id:
                pid, pver = response.prototype_ref.id, response.prototype_ref.version
                proto_edit, proto_bytes, fetched, decode_us = await self._prototype(
                    response, pid, pver
                )
                down += fetched
            payload_bytes = len(response.edit_payload)
            prepared, res_us, apply_us = await loop.run_in_executor(
                self.executor, self._build_edit_timed, response.edit_payload, proto_edit
            )
            decode_us += res_us
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, RecsysError, ConnectionError) as exc:
            if isinstance(exc, grpc.aio.AioRpcError):
                why = f"{exc.code().name}: {exc.details()}"
            elif isinstance(exc, RecsysError):
                why = f"rejected the cloud's edit: {exc}"
            else:
                why = str(exc)
            st.failed = True
            st.note = f"edit request failed ({why}); serving the " + (
                "last good edit" if st.edit is not None else "base model"
            )
            st.gate.anchor = previous_anchor  # measure the next shift from the last good edit
            self.edit_failures += 1
            logger.warning("user %r: %s", user_id, st.note)
            return FetchResult(
                "failed", up, down, payload_bytes, proto_bytes, cloud_ms, decode_us, apply_us
            )
        finally:
            st.pending = None
        st.edit = prepared
        st.edit_info = EditInfo(
            edit_id=int(response.edit_id),
            prototype_id=pid,
            prototype_version=pver,
            source="cloud",
            payload_bytes=len(response.edit_payload) + proto_bytes,
            applied_at_ms=int(time.time() * 1000),
        )
        st.failed, st.note = False, ""
        logger.debug(
            "user %r: edit %d applied (prototype %d v%d, %d B, %.1f ms, cloud batch %d)",
            user_id,
            response.edit_id,
            pid,
            pver,
            st.edit_info.payload_bytes,
            (time.perf_counter() - t0) * 1000,
            response.batch_size,
        )
        return FetchResult(
            "applied", up, down, payload_bytes, proto_bytes, cloud_ms, decode_us, apply_us
        )

    async def _prototype(
        self, response: cpb.GenerateEditResponse, pid: int, pver: int
    ) -> tuple[HeadEdit, int, int, float]:
        """The prototype edit a residual refers to: from the response, the cache or the
        cloud; returns (edit, its payload bytes, bytes of a GetPrototype reply or 0, the
        decode time in us)."""
        key = (pid, pver)
        loop = asyncio.get_running_loop()
        nbytes = size = 0
        if response.HasField("prototype") and response.prototype.edit_payload:
            payload = response.prototype.edit_payload
            nbytes = len(payload)
        elif key in self._prototypes:
            self._prototypes.move_to_end(key)
            return self._prototypes[key], 0, 0, 0.0
        else:
            assert self.link is not None
            reply, size = await self.link.get_prototype(
                pid, pver, _DTYPE_ENUM[self.config.cloud.payload_dtype]
            )
            self.bytes_down += size
            payload, nbytes = reply.edit_payload, len(reply.edit_payload)
        edit, us = await loop.run_in_executor(
            self.executor, _timed, self._decode_edit, payload, False
        )
        self._prototypes[key] = edit
        while len(self._prototypes) > PROTOTYPE_CACHE:
            self._prototypes.popitem(last=False)
        return edit, nbytes, size, us

    def _decode_edit(self, payload: bytes, allow_prototype: bool) -> HeadEdit:
        """RSE1 bytes -> a HeadEdit (shapes checked against this ranker's head)."""
        decoded = decode_payload(
            payload, spec=self.ranker.edit_spec(), max_rank=self.ranker.bounds.max_rank
        )
        if decoded.prototype_id is not None and not allow_prototype:
            raise ValidationError("a prototype's own edit must not refer to another prototype")
        return HeadEdit.from_flat(decoded.tensors)

    def _build_edit(self, payload: bytes, prototype: HeadEdit | None) -> PreparedEdit:
        """Decode the residual, add the prototype edit, validate against the bounds."""
        return self._build_edit_timed(payload, prototype)[0]

    def _build_edit_timed(
        self, payload: bytes, prototype: HeadEdit | None
    ) -> tuple[PreparedEdit, float, float]:
        """:meth:`_build_edit` and its device compute: (edit, decode us, apply us)."""
        t0 = time.perf_counter()
        edit = self._decode_edit(payload, allow_prototype=True)
        t1 = time.perf_counter()
        if prototype is not None:
            edit = HeadEdit.compose(prototype, edit)
        prepared = self.ranker.prepare(edit)
        t2 = time.perf_counter()
        return prepared, (t1 - t0) * 1e6, (t2 - t1) * 1e6

    def _summary(self, history: list[int]) -> list[float]:
        return device_summary(self.ranker, history, self.config.cloud.summary_items)

    # ---- ApplyEdit -----------------------------------------------------------------------------
    async def apply_edit(
        self, user_id: str, payload: bytes, source: str = "push"
    ) -> tuple[EditInfo | None, str]:
        """Install a pushed edit for a user (empty payload = revert); returns (edit, mode)."""
        self._require_ready()
        st = self.user(user_id)
        source = source or "push"
        if len(source) > MAX_ID_LEN:
            raise ValidationError(
                f"source label is {len(source)} characters; the limit is {MAX_ID_LEN}"
            )
        if not payload:
            st.edit, st.edit_info = None, None
            st.failed, st.note = False, ""
            return None, self.mode(st)[0]
        loop = asyncio.get_running_loop()
        decoded_head = await loop.run_in_executor(self.executor, self._peek_prototype, payload)
        proto = None
        pid, pver = decoded_head
        if pid is not None:
            proto = self._prototypes.get((pid, pver))
            if proto is None:
                raise NotFoundError(
                    f"the edit refers to prototype {pid} version {pver}, which this device does "
                    "not hold; send an absolute edit or let the device fetch the prototype first"
                )
        prepared = await loop.run_in_executor(self.executor, self._build_edit, payload, proto)
        self._push_counter += 1
        st.edit = prepared
        st.edit_info = EditInfo(
            edit_id=self._push_counter,
            prototype_id=pid or 0,
            prototype_version=pver or 0,
            source=source,
            payload_bytes=len(payload),
            applied_at_ms=int(time.time() * 1000),
        )
        st.failed, st.note = False, ""
        return st.edit_info, self.mode(st)[0]

    def _peek_prototype(self, payload: bytes) -> tuple[int | None, int | None]:
        decoded = decode_payload(
            payload, spec=self.ranker.edit_spec(), max_rank=self.ranker.bounds.max_rank
        )
        return decoded.prototype_id, decoded.prototype_version

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
            "edit_requests": self.edit_requests,
            "edit_failures": self.edit_failures,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "gate_threshold": self.gate.threshold(),
            "gate_budget": self.gate.config.budget,
            "last_cloud_ok_ms": self.link.last_ok_ms if self.link is not None else 0,
            "experiment": self.config.experiment or "",
            "user": None,
        }
        if user_id:
            st = self.user(user_id)
            await self.ensure_arm(st, user_id)
            _, gate = self.arm_policy(st)
            mode, note = self.mode(st)
            out["user"] = {
                "user_id": user_id,
                "history_length": len(st.history),
                "mode": mode,
                "note": note,
                "edit": st.edit_info,
                "events_since_edit": st.gate.events_since_request,
                "last_shift_score": st.gate.last_score,
                "bytes_up": st.bytes_up,
                "bytes_down": st.bytes_down,
                "arm": st.arm or "",
                "adaptive": gate is not None and self.link is not None,
                "trigger": "timer" if isinstance(gate, TimerGate) else "gate",
                "gate_budget": gate.config.budget if gate is not None else 0.0,
                "gate_threshold": gate.threshold() if gate is not None else float("inf"),
            }
        return out
