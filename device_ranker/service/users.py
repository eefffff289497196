"""The device's users: per-user state, the store holding it, and each user's A/B arm.

:class:`UserState` is one device's state: a bounded recent history (item indices, oldest
first) with its timestamps, the set of seen items, the cached user state [D], the active
edit, the request-gate state, the cost counters, the edit's staleness (age and fit,
:class:`~device_ranker.service.policy.Staleness`), the scores of its last ranking (so the
fit signal costs no extra pass when a Recommend preceded the click) and a ring buffer of
its recent user states (what a refining cloud optimises on). It is mutated on the event loop
only; its ``lock`` orders one user's concurrent RecordEvents.

:class:`UserStore` holds the users by id (created by their first event or seeded from a
dataset), maps item ids to the ranker's indices, and resolves each user's experiment arm
once (an injected :data:`~device_ranker.service.policy.ArmResolver`; without one every
user follows the device's own gate). :func:`serving_mode` says how a user is served.

Shapes: D model width, P probes.

Example::

    store = UserStore(ranker.item_ids, config, item_vectors)
    st, new = store.get_or_create("u1")
    await store.ensure_arm(st, "u1")
    policy, gate = store.arm_policy(st)       # (None, the device gate) without an experiment
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from device_ranker.edit_apply import PreparedEdit
from device_ranker.gate import GateState, ShiftGate
from device_ranker.guard import GuardState
from device_ranker.service.config import DeviceConfig
from device_ranker.service.learned_trigger import LearnedTrigger
from device_ranker.service.memory import MemoryMeter
from device_ranker.service.policy import ArmPolicy, ArmResolver, Staleness, TimerGate
from device_ranker.service.state import StoredEvidence, StoredGuard
from recsys.errors import NotFoundError, RecsysError, ValidationError
from recsys.serving.redact import id_ref as user_ref

if TYPE_CHECKING:
    from device_ranker.service.cloud_edits import FetchResult
    from device_ranker.service.cloud_link import CloudLink
    from device_ranker.service.state import DeviceStateStore, StoredUser

# (edit payload, prototype payload or None, stored edit info) -> the prepared edit
RestoreEdit = Callable[[bytes, "bytes | None", dict[str, Any]], PreparedEdit]

logger = logging.getLogger(__name__)

MAX_ID_LEN = 200

# serving modes (the servicer maps them to the proto enum)
BASE = "base"
EDITED = "edited"
FALLBACK_LAST_EDIT = "fallback_last_edit"
FALLBACK_BASE = "fallback_base"


def check_id(what: str, value: str) -> str:
    """A non-empty id of at most :data:`MAX_ID_LEN` characters."""
    if not value:
        raise ValidationError(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LEN:
        raise ValidationError(f"{what} is {len(value)} characters long; the limit is {MAX_ID_LEN}")
    return value


@dataclass(frozen=True)
class EditInfo:
    """What the active edit of a user is (reported in responses and the status)."""

    edit_id: int
    prototype_id: int = 0
    prototype_version: int = 0
    source: str = "cloud"
    payload_bytes: int = 0
    applied_at_ms: int = 0


@dataclass(slots=True)
class UserGuard:
    """One user's harm-guard state.

    Attributes:
        clicks: the last ``window`` clicks' gain differences (the device's test; None
            when the device scores no clicks: an edit held by the cloud only).
        evidence: cumulative (clicks, sum, sum of squares) of the gain differences, what
            the device reports to the cloud.
        candidate: the latest cloud edit when a guard holds it out (scored in shadow).
        held_by: who holds it: "device", "fleet" or "".
        candidate_info / candidate_payload / candidate_proto: the held edit's info and
            RSE1 bytes (its own and its prototype's; what the durable state stores).
    """

    clicks: GuardState | None = None
    evidence: tuple[float, float, float] = (0.0, 0.0, 0.0)
    candidate: PreparedEdit | None = None
    held_by: str = ""
    candidate_info: EditInfo | None = None
    candidate_payload: bytes | None = None
    candidate_proto: bytes | None = None

    def record(self, base_rank: int, edit_rank: int) -> None:
        """A click scored by the base head and the candidate edit (1-based ranks)."""
        assert self.clicks is not None
        self.clicks.record(base_rank, edit_rank)
        d = self.clicks.diffs[-1]
        n, total, squares = self.evidence
        self.evidence = (n + 1.0, total + d, squares + d * d)

    def saved(self) -> tuple[list[float], tuple[float, float, float]]:
        """The evidence as it is (to put back with :meth:`restore` when the click that
        follows cannot be made durable)."""
        return (list(self.clicks.diffs) if self.clicks is not None else []), self.evidence

    def restore(self, saved: tuple[list[float], tuple[float, float, float]]) -> None:
        diffs, self.evidence = saved
        if self.clicks is not None:
            self.clicks.diffs.clear()
            self.clicks.diffs.extend(diffs)

    def stored_evidence(self) -> StoredEvidence | None:
        """The evidence as the durable state stores it (None: no click scored)."""
        if self.clicks is None or not self.evidence[0]:
            return None
        n, total, squares = self.evidence
        window = self.clicks.diffs.maxlen or len(self.clicks.diffs)
        return StoredEvidence(window, tuple(self.clicks.diffs), int(n), total, squares)

    def stored(self, model_version: str) -> StoredGuard | None:
        """The guard state as the durable state stores it (the candidate's info carries
        the ranker's ``model_version``, as the active edit's does); None when there is
        nothing to store (no click scored, nothing held)."""
        info = None
        if self.candidate is not None and self.candidate_info is not None:
            info = {**dataclasses.asdict(self.candidate_info), "model_version": model_version}
        held = info is not None and bool(self.candidate_payload)
        stored = StoredGuard(
            evidence=self.stored_evidence(),
            held_by=self.held_by if held else "",
            candidate_payload=self.candidate_payload if held else None,
            candidate_proto=self.candidate_proto if held else None,
            candidate_info=info if held else None,
        )
        return None if stored == StoredGuard() else stored


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
    staleness: Staleness = field(default_factory=Staleness)
    # full-catalogue scores [I] of the last ranking: (version, the edit it used, scores)
    scores: tuple[int, PreparedEdit | None, torch.Tensor] | None = None
    # items ever in the history (seeded + recorded): the position of the next event
    position: int = 0
    # user states before recent positions: (position, state [D]), oldest first
    past_states: deque[tuple[int, torch.Tensor]] = field(default_factory=lambda: deque(maxlen=0))
    arm: str | None = None  # experiment arm (None = not resolved yet; "" = no experiment)
    # orders one user's concurrent RecordEvents: rank-for-the-log, append, gate, request
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the active edit's RSE1 bytes and its prototype's (what the durable state stores)
    edit_payload: bytes | None = None
    proto_payload: bytes | None = None
    durable: bool = False  # the device state holds this user (snapshot written)
    since_snapshot: int = 0  # events stored after the user's last snapshot
    # memory accounting (device_ranker.service.memory): the bytes this user was last
    # counted at, and the meter that counts it (None: not held by a store)
    mem_bytes: int = 0
    meter: MemoryMeter | None = field(default=None, repr=False)
    # the harm guards (issue 15): the click evidence and the held edit (None: no guard
    # scores this user's clicks and no edit of it was held)
    guard: UserGuard | None = None
    # the base head's rank of each recorded click, aligned with the end of the history
    # (the learned trigger's features; NaN = not ranked; None: no learned trigger)
    base_ranks: deque[float] | None = None

    @property
    def candidate(self) -> PreparedEdit | None:
        """The latest cloud edit when a guard holds it out (served: the base head)."""
        return self.guard.candidate if self.guard is not None else None

    @property
    def held_by(self) -> str:
        """Who holds the user's latest edit out: "device", "fleet" or "" (none)."""
        return self.guard.held_by if self.guard is not None else ""

    @property
    def shadow_edit(self) -> PreparedEdit | None:
        """The candidate edit the guard scores a click with: the held one, else the
        served one (None: no edit, nothing to score)."""
        return self.candidate if self.candidate is not None else self.edit

    def hold(
        self,
        candidate: PreparedEdit,
        held_by: str,
        info: EditInfo | None = None,
        payload: bytes | None = None,
        proto_payload: bytes | None = None,
    ) -> None:
        """A guard keeps ``candidate`` out: the user is served the base head (``info``,
        ``payload``, ``proto_payload``: the candidate's, kept for the durable state)."""
        self.install_edit(None, None)
        if self.guard is None:
            self.guard = UserGuard()
        g = self.guard
        g.candidate, g.held_by = candidate, held_by
        g.candidate_info, g.candidate_payload, g.candidate_proto = info, payload, proto_payload
        if self.meter is not None:
            self.meter.account(self)

    def install_edit(
        self,
        edit: PreparedEdit | None,
        info: EditInfo | None,
        payload: bytes | None = None,
        proto_payload: bytes | None = None,
    ) -> None:
        """Make ``edit`` the active edit (None = back to the base model; ``payload`` /
        ``proto_payload``: its bytes, kept for the durable state); clears a failure and
        restarts the staleness clock (age 0, no click ranked under it yet)."""
        self.edit, self.edit_info = edit, info
        if self.guard is not None:
            g = self.guard
            g.candidate, g.held_by = None, ""
            g.candidate_info = g.candidate_payload = g.candidate_proto = None
        self.edit_payload = payload if edit is not None else None
        self.proto_payload = proto_payload if edit is not None else None
        self.failed, self.note = False, ""
        self.staleness.reset(self.times[-1] if self.times else None)
        if self.meter is not None:  # a background install is counted at once
            self.meter.account(self)

    def append(self, item: int, timestamp: int) -> None:
        """Record an event: history, time, seen set, version, position, edit age."""
        self.history.append(item)
        self.times.append(int(timestamp))
        self.seen.add(item)
        self.version += 1
        self.position += 1
        self.staleness.events += 1
        if self.staleness.applied_event_time is None:  # the base model, since this event
            self.staleness.applied_event_time = int(timestamp)
        if self.meter is not None:
            self.meter.account(self)

    def staleness_status(self) -> dict[str, Any]:
        """The current edit's age and fit (GetStatus)."""
        s = self.staleness
        age, clock = s.age_seconds(self.times[-1] if self.times else None)
        mrr, mean_rank, clicks = s.fit()
        return {
            "events_since_apply": s.events,
            "edit_age_seconds": age,
            "edit_age_clock": clock,
            "fit_mrr": mrr,
            "fit_mean_rank": mean_rank,
            "fit_clicks": clicks,
        }


def _edit_info(info: dict[str, Any]) -> EditInfo:
    """EditInfo from a stored edit's info (other keys, e.g. the model version, dropped)."""
    return EditInfo(**{k: info[k] for k in EditInfo.__dataclass_fields__ if k in info})


def serving_mode(st: UserState, adaptive: bool, link: CloudLink | None) -> tuple[str, str]:
    """(serving mode, note) of a user right now: base for a static arm; a fallback mode
    (with the reason) after a failed request or while the cloud is unreachable."""
    if not adaptive:
        return BASE, ""
    cloud_down = link is not None and not link.reachable
    if st.failed or cloud_down:
        note = st.note if st.failed else f"cloud unreachable ({link.last_error})"
        return (FALLBACK_LAST_EDIT if st.edit is not None else FALLBACK_BASE), note
    if st.edit is None and st.held_by:
        return BASE, f"the latest edit is held by the {st.held_by} harm guard (base head)"
    return (EDITED if st.edit is not None else BASE), ""


class UserStore:
    """The users of one device server, the item catalogue they refer to, and their arms.

    **Bounded**: at most ``config.max_users`` users, and with ``config.max_memory_mb`` at
    most that many MiB of estimated user state (:mod:`device_ranker.service.memory`:
    histories, seen sets, cached states and scores, edits and their payloads, per-user
    overhead; kept up to date per user, never recomputed by a walk), are held in memory,
    least recently used first out. A user is "used" by any call naming it (Recommend,
    RecordEvent, GetStatus, ApplyEdit, RequestEdit). A user with a RecordEvent or an edit
    request in flight is never evicted (the next idle one goes instead), nor is the most
    recently used one (so a cap smaller than one user still serves it). With a durable state
    (``durable``), an evicted user is written first (if it is not durable yet: a seeded
    user that never had an event) and is reloaded from the state file on its next call,
    as it was; without one, an evicted user's state is gone (its next RecordEvent starts a
    new user; other calls answer NOT_FOUND).

    Args:
        item_ids: the ranker's item ids in index order (I).
        config: :class:`DeviceConfig` (history length, default gate and trigger, limits).
        item_vectors: [I, D] item embeddings the shift gates compare windows with.
        arm_for: the experiment's arm resolver (None = no experiment).
    """

    def __init__(
        self,
        item_ids: Sequence[str],
        config: DeviceConfig,
        item_vectors: np.ndarray,
        arm_for: ArmResolver | None = None,
    ) -> None:
        self.config = config
        self.item_ids: list[str] = list(item_ids)
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.users: OrderedDict[str, UserState] = OrderedDict()  # least recently used first
        self.max_users = config.max_users
        self.max_bytes = (
            int(config.max_memory_mb * 2**20) if config.max_memory_mb is not None else None
        )
        self.meter = MemoryMeter()
        self.evicted_bytes = 0
        self.durable: DeviceStateStore | None = None  # set by the engine (--state)
        self.restore_edit: RestoreEdit | None = None  # set by the engine
        self.evicted = 0
        self.reloaded = 0
        self.item_vectors = item_vectors  # [I, D]
        self.gate: ShiftGate | TimerGate | LearnedTrigger = make_trigger(config, item_vectors)
        self.arm_for = arm_for
        # arm name -> (its policy, its gate: None for a static arm)
        self._arms: dict[str, tuple[ArmPolicy, ShiftGate | TimerGate | None]] = {}

    # ---- users -----------------------------------------------------------------------------
    def _blank(self) -> UserState:
        n = self.config.history_len
        st = UserState(history=deque(maxlen=n), times=deque(maxlen=n))
        st.staleness.ranks = deque(maxlen=self.config.staleness.fit_clicks)
        st.past_states = deque(maxlen=self.config.cloud.uplink_states)
        if self.config.scores_guard:
            st.guard = UserGuard(GuardState.empty(self.config.guard_settings.window))
        if self.config.trigger == "learned":
            st.base_ranks = deque(maxlen=n)
        st.meter = self.meter
        return st

    def new_user(self, user_id: str, *, evict: bool = True) -> UserState:
        st = self._blank()
        self.users[user_id] = st
        self.meter.account(st)
        if evict:
            self.evict_over_cap()
        return st

    def account(self, st: UserState) -> None:
        """Re-estimate a user after a change the user's own methods do not see (a ranking
        cached its state and scores) and evict beyond the caps. A user evicted meanwhile
        (while its Recommend awaited the ranking) is not counted again."""
        if st.meter is not self.meter:
            return
        self.meter.account(st)
        if self.max_bytes is not None and self.meter.total > self.max_bytes:
            self.evict_over_cap()

    @property
    def bytes_held(self) -> int:
        """Estimated bytes of the users in memory (:mod:`device_ranker.service.memory`)."""
        return self.meter.total

    def get(self, user_id: str) -> UserState | None:
        """The user from memory, else from the durable state (then held in memory again),
        else None; marks it most recently used."""
        st = self.users.get(user_id)
        if st is not None:
            self.users.move_to_end(user_id)
            return st
        if self.durable is None:
            return None
        stored = self.durable.load_user(user_id)
        if stored is None:
            return None
        st = self._from_stored(user_id, stored)
        self.users[user_id] = st
        self.meter.account(st)
        self.reloaded += 1
        self.evict_over_cap()
        return st

    def _from_stored(self, user_id: str, stored: StoredUser) -> UserState:
        """A user rebuilt from its snapshot, the events after it and its edit."""
        st = self._blank()
        rows = stored.history + [(item, t) for _, item, t in stored.events]
        for item, t in rows[-self.config.history_len :]:
            idx = self.item_index.get(item)
            if idx is not None:  # an item the ranker no longer has is skipped
                st.history.append(idx)
                st.times.append(int(t))
        items = stored.seen + [item for _, item, _ in stored.events]
        st.seen = {self.item_index[i] for i in items if i in self.item_index}
        st.position = stored.events[-1][0] if stored.events else stored.position
        st.durable, st.since_snapshot = True, len(stored.events)
        st.staleness.applied_event_time = st.times[-1] if st.times else None
        info = stored.edit_info
        if stored.edit_payload and info is not None and self.restore_edit is not None:
            try:
                edit = self.restore_edit(stored.edit_payload, stored.proto_payload, info)
            except Exception as exc:  # another ranker, a corrupt row: serve the base model
                logger.warning("user %s: stored edit not restored (%s)", user_ref(user_id), exc)
            else:
                st.install_edit(edit, _edit_info(info), stored.edit_payload,
                                stored.proto_payload)  # fmt: skip
        if stored.guard is not None:
            self._restore_guard(user_id, st, stored.guard)
        return st

    def _restore_guard(self, user_id: str, st: UserState, stored: StoredGuard) -> None:
        """The stored evidence (when this device scores clicks, ``--guard`` or
        ``--guard-report``: its window is the configured one, the oldest values dropped
        when it shrank; a device that scores none ignores it, and the user's next edit
        write drops it) and the held candidate
        (one stored for another ranker, or that does not decode, is dropped: the user is
        served the base head either way)."""
        ev = stored.evidence
        if ev is not None and st.guard is not None and st.guard.clicks is not None:
            st.guard.clicks.diffs.extend(ev.diffs)  # a deque of the configured window
            st.guard.evidence = (float(ev.clicks), ev.total, ev.squares)
        info = stored.candidate_info
        if not stored.candidate_payload or info is None or self.restore_edit is None:
            return
        try:
            edit = self.restore_edit(stored.candidate_payload, stored.candidate_proto, info)
        except Exception as exc:  # another ranker, a corrupt row: nothing held any more
            logger.warning("user %s: stored candidate edit not restored (%s)",
                           user_ref(user_id), exc)  # fmt: skip
            return
        st.hold(edit, stored.held_by, _edit_info(info), stored.candidate_payload,
                stored.candidate_proto)  # fmt: skip

    def snapshot(self, st: UserState) -> tuple[int, list[tuple[str, int]], list[str]]:
        """(position, history as (item id, time), seen item ids): what the state stores."""
        ids = self.item_ids
        history = [(ids[i], int(t)) for i, t in zip(st.history, st.times, strict=True)]
        return st.position, history, [ids[i] for i in st.seen]

    def make_durable(self, user_id: str, st: UserState) -> None:
        """Write the user's snapshot if the durable state does not hold it yet."""
        if self.durable is not None and not st.durable:
            self.durable.write_snapshot(user_id, *self.snapshot(st))
            st.durable, st.since_snapshot = True, 0

    def _over(self, users: int, held: int) -> bool:
        return users > self.max_users or (self.max_bytes is not None and held > self.max_bytes)

    def evict_over_cap(self) -> int:
        """Evict least recently used idle users while over ``max_users`` or ``max_bytes``
        (the most recently used user always stays); returns how many were evicted."""
        users, held = len(self.users), self.meter.total
        if not self._over(users, held):
            return 0
        newest = next(reversed(self.users))
        victims = []
        for user_id, st in self.users.items():  # oldest first, until under both caps
            if not self._over(users, held) or user_id == newest:
                break
            if st.lock.locked() or st.pending is not None:
                continue  # busy: its RecordEvent / edit request holds it
            victims.append((user_id, st))
            users, held = users - 1, held - st.mem_bytes
        evicted = 0
        for user_id, st in victims:
            try:
                self.make_durable(user_id, st)
            except RecsysError:
                logger.exception("user %s: not evicted (its state could not be written)",
                                 user_ref(user_id))  # fmt: skip
                continue
            del self.users[user_id]
            self.evicted_bytes += self.meter.forget(st)
            st.meter = None  # a task still holding it must not count it again
            self.evicted += 1
            evicted += 1
        return evicted

    def user(self, user_id: str) -> UserState:
        """A known user (its id checked; from memory or the durable state); NotFoundError
        for an unknown one."""
        st = self.get(check_id("user_id", user_id))
        if st is None:
            raise NotFoundError(
                f"unknown user {user_id!r}: the device has no state for it; record an event "
                "first (RecordEvent creates the user)"
            )
        return st

    def seed_from_dataset(self) -> int:
        """Give every user of the configured dataset its (training-period) history;
        returns the number of users."""
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
        stored = self.durable.user_ids() if self.durable is not None else set()
        shared = list(self.item_index.values())  # the catalogue's int objects, not copies
        for u, i, t in zip(users.tolist(), items.tolist(), times.tolist(), strict=True):
            if i < 0 or user_ids[u] in stored:  # a stored user supersedes its seed
                continue
            i = shared[i]
            st = self.users.get(user_ids[u])
            if st is None:
                st = self.new_user(user_ids[u], evict=False)
            st.history.append(i)
            st.times.append(int(t))
            st.seen.add(i)
            st.position += 1
        for st in self.users.values():  # seeding creates them: the base model's age starts
            st.staleness.applied_event_time = st.times[-1] if st.times else None
            self.meter.account(st)
        seeded = len(self.users)
        self.evict_over_cap()
        return seeded

    # ---- the catalogue --------------------------------------------------------------------
    def item(self, item_id: str) -> int:
        """Item id -> the ranker's index; NotFoundError for an item outside the catalogue."""
        idx = self.item_index.get(check_id("item_id", item_id))
        if idx is None:
            raise NotFoundError(f"unknown item {item_id!r}: not in the ranker's catalogue")
        return idx

    def candidate_indices(self, candidates: Sequence[str]) -> np.ndarray:
        """A Recommend's candidate ids -> sorted unique item indices (empty, too many or
        unknown: ValidationError / NotFoundError)."""
        if len(candidates) == 0:
            raise ValidationError(
                "the candidate list is empty; leave `candidates` unset to rank the whole catalogue"
            )
        limit = self.config.max_candidates
        if len(candidates) > limit:
            raise ValidationError(f"{len(candidates)} candidates; the limit is {limit}")
        return np.unique(np.fromiter((self.item(c) for c in candidates), np.int64))

    def probe_indices(self, probes: Sequence[str]) -> np.ndarray:
        """Probe ids -> item indices [P] (unknown or too many: ValidationError)."""
        limit = self.config.max_probes
        if len(probes) > limit:
            raise ValidationError(f"{len(probes)} probe items; the limit is {limit}")
        idx = np.empty(len(probes), dtype=np.int64)
        for n, item in enumerate(probes):  # P <= max_probes dict look-ups
            found = self.item_index.get(item)
            if found is None:
                raise ValidationError(
                    f"unknown probe item {item[:100]!r} (position {n}): probes must be items "
                    "of the ranker's catalogue"
                )
            idx[n] = found
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
        """Whether the user's device adapts (False for a static arm)."""
        policy, _ = self.arm_policy(st)
        return policy is None or policy.adaptive

    def user_status(self, user_id: str, st: UserState, link: CloudLink | None) -> dict[str, Any]:
        """The GetStatus figures of one user (its arm resolved)."""
        _, gate = self.arm_policy(st)
        mode, note = serving_mode(st, self.adaptive(st), link)
        evidence = st.guard.evidence if st.guard is not None else (0.0, 0.0, 0.0)
        return {
            "user_id": user_id,
            "history_length": len(st.history),
            "mode": mode,
            "note": note,
            "edit": st.edit_info,
            "events_since_edit": st.gate.events_since_request,
            **st.staleness_status(),
            "last_shift_score": st.gate.last_score,
            "bytes_up": st.bytes_up,
            "bytes_down": st.bytes_down,
            "arm": st.arm or "",
            "adaptive": gate is not None and link is not None,
            "trigger": trigger_name(gate),
            "gate_budget": gate.config.budget if gate is not None else 0.0,
            "gate_threshold": gate.threshold() if gate is not None else float("inf"),
            "guard_clicks": int(evidence[0]),
            "guard_mean_gain_diff": evidence[1] / evidence[0] if evidence[0] else float("nan"),
            "held_by": st.held_by,
        }


def trigger_name(gate: Any) -> str:
    """ "timer", "learned" or "gate" (the shift gate)."""
    if isinstance(gate, TimerGate):
        return "timer"
    return "learned" if isinstance(gate, LearnedTrigger) else "gate"


def make_trigger(
    config: DeviceConfig, item_vectors: np.ndarray
) -> ShiftGate | TimerGate | LearnedTrigger:
    """The device's own request trigger (``config.trigger``); the learned gate's
    weights are read from ``config.learned_gate`` (NotFoundError / ValidationError)."""
    if config.trigger == "timer":
        return TimerGate(config.gate)
    if config.trigger == "learned":
        from device_ranker.learned_gate import load_gate_model

        assert config.learned_gate is not None
        return LearnedTrigger(load_gate_model(config.learned_gate), config.gate, item_vectors)
    return ShiftGate(config.gate, item_vectors=item_vectors)
