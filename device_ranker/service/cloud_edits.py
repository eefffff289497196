"""Where a device's edits come from: GenerateEdit requests to the cloud, and pushed edits.

:class:`CloudEdits` sends a user's edit request (its last ``recent_items`` item ids,
:func:`recsys.adaptor_inputs.uplink_window`, plus the device summary, :func:`device_summary`,
and a deadline), decodes the answer (an RSE1 payload: residual + prototype reference),
composes it with the prototype edit (kept in an LRU cache per version, fetched with
GetPrototype when missing), validates it against the device's bounds and makes it the
user's active edit. When the cloud is slow, down or sends a bad edit, the user keeps the
last good edit (or the base model), its state says so (``failed``/``note``), the gate
measures the next shift from the last good edit, and the log has a warning.

With ``CloudLinkConfig.uplink_states = P`` a request also carries the ranker's user
states before each of the user's last P positions (:func:`recent_states`: from the
user's ring buffer of states its rankings computed, the missing ones in one batched
encoder pass) and the items beyond the uplink window those positions need, so a cloud
that refines edits (issue 13) can optimise on them; the device still only applies what
comes back.

**Harm guards** (issue 15): with ``guard`` (``recsys serve device --guard``) a new cloud
edit is applied only when :meth:`device_ranker.guard.HarmGuard.accept` passes on the
user's evidence (its last clicks scored by the base head and its candidate edit, recorded
by the engine); and whatever the device's flags, an edit the cloud's fleet guard answers
with ``EDIT_DECISION_HOLD`` is held. A held edit is not served: the user gets the base
head, the edit stays its candidate (scored in shadow on its next clicks) and the outcome
is "held" (with a durable state the candidate is stored beside the base head and
reloaded after a restart, as is the evidence). With ``report_evidence`` each request
carries the user's cumulative evidence (``GuardEvidence``: clicks, sum and sum of squares
of the gain differences) for the cloud's pooled test (:mod:`recsys.serving.fleet_guard`).

The device-wide guard counters (:class:`GuardCounts`: accepted, rejected by the device,
held by the fleet) count a decision only once its outcome is stored: with a durable state
the decision's increments are written in the same transaction as the new edit or
candidate (``on_install``), and added in memory after it commits; a write that fails
puts the user back as it was (edit, candidate, staleness clock, gate anchor), counts
nothing and makes the request "failed" (the user keeps the last good edit, its note says
why). The counts are loaded from the state when the device starts.

ApplyEdit (:meth:`CloudEdits.prepare_pushed`, then the engine installs it) takes an edit
pushed to the device; it may refer only to a prototype the device holds.

Decoding and composing run on the device's ranking thread (the ``executor``); their times
come back in :class:`FetchResult`.

Example::

    edits = CloudEdits(ranker, link, config.cloud, model_version, executor)
    outcome, cost, task = await edits.request("u1", st, gate, wait=True)   # "applied", ...
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, fields, replace
from typing import Any

import grpc
import grpc.aio
import numpy as np
import torch

from device_ranker.edit_apply import PreparedEdit
from device_ranker.edits import HeadEdit
from device_ranker.features import history_kjt
from device_ranker.gate import ShiftGate
from device_ranker.guard import HarmGuard
from device_ranker.ranker import Ranker
from device_ranker.service.cloud_link import CloudLink
from device_ranker.service.config import CloudLinkConfig
from device_ranker.service.policy import Staleness, TimerGate
from device_ranker.service.users import MAX_ID_LEN, EditInfo, UserState
from recsys import adaptor_inputs
from recsys.edit_payload import DecodedPayload, decode_payload, decode_values
from recsys.errors import NotFoundError, RecsysError, ValidationError
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.serving import tracing
from recsys.serving.redact import id_ref

logger = logging.getLogger(__name__)

PROTOTYPE_CACHE = 256  # prototype versions kept on the device (LRU)
_DTYPE_ENUM = {
    "fp16": cpb.PAYLOAD_DTYPE_FP16,
    "int8": cpb.PAYLOAD_DTYPE_INT8,
    "fp32": cpb.PAYLOAD_DTYPE_FP32,
}
_STATE_DTYPES = {
    "fp16": (cpb.STATE_DTYPE_FP16, np.dtype("<f2")),
    "fp32": (cpb.STATE_DTYPE_FP32, np.dtype("<f4")),
}


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """(fn(*args), its wall time in us): the device's compute, measured where it runs."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t0) * 1e6


def device_summary(ranker: Ranker, history: Sequence[int], summary_items: int) -> list[float]:
    """The uplink summary [2D] of one history (oldest first), as the adaptor was trained
    to read it: :func:`recsys.adaptor_inputs.device_summary` with the ranker's item table
    and its user state of the whole history."""
    model = ranker.model
    hist = np.asarray(history, dtype=np.int64)  # [H]
    with torch.inference_mode():
        state = model.user_states(history_kjt([hist], model.cfg.max_len))  # [1, D]
        summary = adaptor_inputs.device_summary(
            model.item_table.detach(), [hist], state, summary_items
        )  # [1, 2D]
        return summary[0].tolist()


def recent_states(
    ranker: Ranker,
    history: Sequence[int],
    position: int,
    known: Mapping[int, torch.Tensor],
    count: int,
) -> tuple[np.ndarray, list[int]]:
    """The user states before the last ``min(count, H - 1)`` positions of ``history``
    (H items, oldest first; the next event's absolute position is ``position``):
    (float32 [P, D] oldest first, the relative indices [P] of the items that followed).

    ``known`` maps absolute positions to states a ranking already computed (the user's
    ring buffer); the others come from one batched encoder pass over the prefixes.
    """
    n = len(history)
    p = max(0, min(count, n - 1))
    rel = list(range(n - p, n))  # the target of row k is history[rel[k]]
    offset = position - n  # absolute position of history[0]
    rows: list[torch.Tensor | None] = [known.get(offset + j) for j in rel]
    missing = [k for k, row in enumerate(rows) if row is None]
    if missing:
        hist = np.asarray(history, dtype=np.int64)
        model = ranker.model
        with torch.inference_mode():
            fresh = model.user_states(
                history_kjt([hist[: rel[k]] for k in missing], model.cfg.max_len)
            )  # [M, D]
        for m, k in enumerate(missing):
            rows[k] = fresh[m]
    dim = int(ranker.model.item_table.shape[1])
    states = torch.stack(rows).numpy() if rows else np.zeros((0, dim), np.float32)  # [P, D]
    return states.astype(np.float32, copy=False), rel


@dataclass
class FetchResult:
    """One edit request: "applied" or "failed", and what it cost (the proto's EditCost).
    :meth:`CloudEdits._fetch` fills the costs in step by step and sets the outcome last.

    Attributes:
        bytes_up / bytes_down: serialized GenerateEdit request / response (+ GetPrototype).
        payload_bytes: the residual's RSE1 payload; prototype_bytes: a prototype payload
            received for it (0 when the device held it).
        cloud_ms: the cloud engine's time.
        states_us: device compute for the uplinked recent states (0 without).
        decode_us / apply_us: device compute on the ranking thread: RSE1 -> one float32
            array (``decode_values``), then compose + validate + the factored head weights
            (``Ranker.prepare_decoded``).
    """

    outcome: str  # "applied", "held" (a guard kept it out), "failed", ...
    bytes_up: int = 0
    bytes_down: int = 0
    payload_bytes: int = 0
    prototype_bytes: int = 0
    cloud_ms: float = 0.0
    decode_us: float = 0.0
    apply_us: float = 0.0
    states_us: float = 0.0


def _why_failed(exc: Exception) -> str:
    """Why an edit request failed, for the user's note: the gRPC status, the device's
    refusal of the cloud's edit, or the connection error."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, RecsysError):
        return f"rejected the cloud's edit: {exc}"
    return str(exc)


@dataclass
class GuardCounts:
    """The device-wide harm-guard decisions (GetStatus; durable with a state file: the
    names are the state's counter names).

    Attributes:
        guard_accepted: new edits the device's harm test passed.
        guard_rejected: ... it failed: held by the device.
        fleet_held: new edits the cloud's fleet guard said to hold.
    """

    guard_accepted: int = 0
    guard_rejected: int = 0
    fleet_held: int = 0

    @classmethod
    def from_stored(cls, stored: Mapping[str, int]) -> GuardCounts:
        """The counts a state file holds (:meth:`DeviceStateStore.counters`; a missing
        name is 0, other names are not guard counters and are ignored)."""
        return cls(**{f.name: int(stored.get(f.name, 0)) for f in fields(cls)})

    def add(self, increments: Mapping[str, int]) -> None:
        """Count one decision (``increments``: name -> how many, as
        :meth:`CloudEdits.decide` returns them)."""
        for name, n in increments.items():
            setattr(self, name, getattr(self, name) + n)


@dataclass(frozen=True)
class ServedEdits:
    """What installing or holding an edit changes on a user (the active edit, the held
    candidate, the failure note, the staleness clock), to put back when the change cannot
    be made durable: ``saved = ServedEdits.of(st)`` ... ``saved.restore(st)``."""

    edit: tuple[Any, ...]  # (edit, info, payload, prototype payload)
    held: tuple[Any, ...] | None  # (candidate, held_by, info, payload, prototype payload)
    had_guard: bool
    failed: bool
    note: str
    staleness: Staleness

    @classmethod
    def of(cls, st: UserState) -> ServedEdits:
        g = st.guard
        held = None
        if g is not None and g.candidate is not None:
            held = (g.candidate, g.held_by, g.candidate_info, g.candidate_payload,
                    g.candidate_proto)  # fmt: skip
        return cls((st.edit, st.edit_info, st.edit_payload, st.proto_payload), held,
                   g is not None, st.failed, st.note, copy.deepcopy(st.staleness))  # fmt: skip

    def restore(self, st: UserState) -> None:
        st.install_edit(*self.edit)
        if self.held is not None:  # the candidate a guard held before, held again
            st.hold(*self.held)
        if not self.had_guard:
            st.guard = None
        st.failed, st.note, st.staleness = self.failed, self.note, self.staleness
        if st.meter is not None:
            st.meter.account(st)


class CloudEdits:
    """Edit requests to the cloud, the prototype cache, and pushed edits.

    Args:
        ranker: the device's ranker (edit shapes and bounds).
        link: the cloud client (None = no cloud: nothing is ever requested).
        config: the link's :class:`CloudLinkConfig` (uplink, summary, payload dtype).
        model_version: fingerprint of the ranker sent with edit requests.
        item_ids: the ranker's item ids in index order (the uplink sends ids).
        executor: the ranking thread (decode, compose, summary).
        guard: the device harm guard (None = the device applies every edit unless the
            cloud's fleet guard holds it).
        report_evidence: send the user's guard evidence with every request.
    """

    def __init__(
        self,
        ranker: Ranker,
        link: CloudLink | None,
        config: CloudLinkConfig,
        model_version: str,
        item_ids: Sequence[str],
        executor: Executor,
        guard: HarmGuard | None = None,
        report_evidence: bool = False,
    ) -> None:
        self.ranker = ranker
        self.guard = guard
        self.report_evidence = report_evidence or guard is not None
        self.counts = GuardCounts()  # decisions whose outcome was stored
        self.link = link
        self.config = config
        self.model_version = model_version
        self.item_ids = list(item_ids)
        self.executor = executor
        self._prototypes: OrderedDict[tuple[int, int], HeadEdit] = OrderedDict()
        self._prototype_bytes: dict[tuple[int, int], bytes] = {}  # their RSE1 payloads
        # called after a cloud edit is installed or held (user id, state, the guard
        # decision's counter increments): writes the durable state, in one transaction;
        # a RecsysError undoes the install (nothing counted)
        self.on_install: Callable[[str, UserState, Mapping[str, int]], None] | None = None
        self.requests = 0
        self.failures = 0
        self.applied = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._push_counter = 0

    async def request(
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
        known = dict(st.past_states) if self.config.uplink_states else {}
        task = asyncio.get_running_loop().create_task(
            self._fetch(user_id, st, history, list(st.times), previous_anchor, st.position, known)
        )
        st.pending = task
        if not wait:
            return "pending", none, task
        fetched = await asyncio.shield(task)
        return fetched.outcome, fetched, task

    async def _fetch(
        self,
        user_id: str,
        st: UserState,
        history: list[int],
        times: list[int],
        previous_anchor: Any,
        position: int = 0,
        known: Mapping[int, torch.Tensor] | None = None,
    ) -> FetchResult:
        """Ask the cloud for the user's edit and apply it: "applied" or "failed", with the
        request's bytes up / down (GenerateEdit + a fetched prototype) and cloud time."""
        assert self.link is not None
        self.requests += 1
        t0 = time.perf_counter()
        figures = FetchResult("pending")
        try:
            request = await self._edit_request(
                user_id, st, history, times, position, known, figures
            )
            response = await self._ask_cloud(st, request, figures)
            prepared, pid, pver = await self._prepare_response(response, figures)
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, RecsysError, ConnectionError) as exc:
            return self._failed(user_id, st, _why_failed(exc), previous_anchor, figures)
        finally:
            st.pending = None
        return self._install(
            user_id, st, response, prepared, (pid, pver), previous_anchor, figures, t0
        )

    async def _edit_request(
        self,
        user_id: str,
        st: UserState,
        history: list[int],
        times: list[int],
        position: int,
        known: Mapping[int, torch.Tensor] | None,
        figures: FetchResult,
    ) -> cpb.GenerateEditRequest:
        """The user's GenerateEdit request: its uplink window, summary, guard evidence,
        cached prototype and (with ``uplink_states``) recent states, whose device time goes
        to ``figures.states_us``. Raises ConnectionError when the link is down."""
        assert self.link is not None
        link, cfg = self.link, self.config
        loop = asyncio.get_running_loop()
        if not link.reachable:
            raise ConnectionError(f"cloud unreachable ({link.last_error}); not asked")
        recent = adaptor_inputs.uplink_window(history, cfg.recent_items)  # [<=N]
        summary: list[float] = []
        if cfg.send_summary:
            summary = await loop.run_in_executor(self.executor, self.summary, history)
        request = cpb.GenerateEditRequest(
            device_id=user_id,
            recent_item_ids=[self.item_ids[i] for i in recent],
            recent_timestamps=times[-len(recent) :],
            summary=summary,
            model_version=self.model_version,
            payload_dtype=_DTYPE_ENUM[cfg.payload_dtype],
        )
        if self.report_evidence:
            n, total, squares = st.guard.evidence if st.guard else (0.0, 0.0, 0.0)
            request.guard_evidence.CopyFrom(
                cpb.GuardEvidence(clicks=int(n), gain_diff_sum=total, gain_diff_sum_squares=squares)
            )
        if st.edit_info is not None and st.edit_info.prototype_id:
            request.cached_prototype.id = st.edit_info.prototype_id
            request.cached_prototype.version = st.edit_info.prototype_version
        if cfg.uplink_states:
            (states, rel), figures.states_us = await loop.run_in_executor(
                self.executor,
                _timed,
                recent_states,
                self.ranker,
                history,
                position,
                known or {},
                cfg.uplink_states,
            )
            if len(rel):
                enum, dt = _STATE_DTYPES[cfg.state_dtype]
                first_sent = len(history) - len(recent)  # earlier targets are not uplinked
                request.recent_states.CopyFrom(
                    cpb.RecentStates(
                        states=states.astype(dt).tobytes(),
                        state_dim=states.shape[1],
                        dtype=enum,
                        earlier_item_ids=[self.item_ids[history[j]] for j in rel
                                          if j < first_sent],
                    )
                )  # fmt: skip
        return request

    async def _ask_cloud(
        self, st: UserState, request: cpb.GenerateEditRequest, figures: FetchResult
    ) -> cpb.GenerateEditResponse:
        """Send ``request``; its bytes up / down count on the user, the device and
        ``figures`` (with the cloud engine's time)."""
        assert self.link is not None
        response, up, down = await self.link.generate_edit(request)
        figures.bytes_up, figures.bytes_down = up, down
        figures.cloud_ms = float(response.engine_ms)
        st.bytes_up += up
        st.bytes_down += down
        self.bytes_up += up
        self.bytes_down += down
        return response

    async def _prepare_response(
        self, response: cpb.GenerateEditResponse, figures: FetchResult
    ) -> tuple[PreparedEdit, int, int]:
        """The answer's edit, composed with its prototype (from the answer, the cache or
        a GetPrototype) and validated on the ranking thread: (edit, prototype id, version;
        0, 0 without a prototype). Payload sizes, a GetPrototype's bytes and the decode /
        apply times go to ``figures``."""
        loop = asyncio.get_running_loop()
        proto_edit, pid, pver = None, 0, 0
        if response.HasField("prototype_ref") and response.prototype_ref.id:
            pid, pver = response.prototype_ref.id, response.prototype_ref.version
            proto_edit, figures.prototype_bytes, fetched, figures.decode_us = await self._prototype(
                response, pid, pver
            )
            figures.bytes_down += fetched
        figures.payload_bytes = len(response.edit_payload)
        with tracing.span("device.decode_edit", payload_bytes=len(response.edit_payload)):
            prepared, res_us, figures.apply_us = await loop.run_in_executor(
                self.executor, self._build_edit_timed, response.edit_payload, proto_edit
            )
        figures.decode_us += res_us
        return prepared, pid, pver

    def _install(
        self,
        user_id: str,
        st: UserState,
        response: cpb.GenerateEditResponse,
        prepared: PreparedEdit,
        prototype: tuple[int, int],
        previous_anchor: Any,
        figures: FetchResult,
        t0: float,
    ) -> FetchResult:
        """Make the prepared edit the user's active edit, or its held candidate when a
        guard holds it, and store it (``on_install``): "applied" or "held"; a failed
        write puts the user back as it was and makes the request "failed".

        Not a coroutine on purpose: between the snapshot of the user and its install /
        restore there is no await, so a concurrent edit of the same user (an ApplyEdit
        request) cannot land in between and be dropped by the restore."""
        pid, pver = prototype
        info = EditInfo(
            edit_id=int(response.edit_id),
            prototype_id=pid,
            prototype_version=pver,
            source="cloud",
            payload_bytes=len(response.edit_payload) + figures.prototype_bytes,
            applied_at_ms=int(time.time() * 1000),
        )
        held_by, counts = self.decide(st, response.decision)
        before = ServedEdits.of(st)
        if held_by:
            st.hold(prepared, held_by, info, response.edit_payload,
                    self._prototype_bytes.get(prototype))  # fmt: skip
        else:
            st.install_edit(
                prepared, info, response.edit_payload, self._prototype_bytes.get(prototype)
            )
        try:  # a held edit: the base head and the candidate, with the decision's counts
            if self.on_install is not None:
                self.on_install(user_id, st, counts)
        except RecsysError as exc:  # not durable: not installed, not counted
            before.restore(st)
            why = f"the device could not store edit {response.edit_id}, see the device log"
            return self._failed(user_id, st, why, previous_anchor, figures, exc)
        self.counts.add(counts)
        if held_by:
            logger.debug("user %s: edit %d held by the %s guard", id_ref(user_id),
                         response.edit_id, held_by)  # fmt: skip
            return replace(figures, outcome="held")
        self.applied += 1
        logger.debug(
            "user %s: edit %d applied (prototype %d v%d, %d B, %.1f ms, cloud batch %d)",
            id_ref(user_id),
            response.edit_id,
            pid,
            pver,
            info.payload_bytes,
            (time.perf_counter() - t0) * 1000,
            response.batch_size,
        )
        return replace(figures, outcome="applied")

    def _failed(
        self,
        user_id: str,
        st: UserState,
        why: str,
        previous_anchor: Any,
        figures: FetchResult,
        exc: Exception | None = None,
    ) -> FetchResult:
        """A failed edit request: the user keeps the last good edit (or the base model),
        its state says why, the gate measures the next shift from the last good edit, the
        failure is counted and logged (with ``exc`` when given)."""
        st.failed = True
        keeps = "last good edit" if st.edit is not None else "base model"
        st.note = f"edit request failed ({why}); serving the {keeps}"
        st.gate.anchor = previous_anchor  # measure the next shift from the last good edit
        self.failures += 1
        if exc is None:
            logger.warning("user %s: %s", id_ref(user_id), st.note)
        else:
            logger.warning("user %s: %s: %s", id_ref(user_id), st.note, exc)
        return replace(figures, outcome="failed")

    @property
    def guarded(self) -> int:
        """Edits received but held out (the device's guard or the cloud's)."""
        return self.counts.guard_rejected + self.counts.fleet_held

    def decide(self, st: UserState, decision: int) -> tuple[str, dict[str, int]]:
        """Who holds a new edit out: "device" (its harm test failed), "fleet" (the
        cloud said hold) or "" (apply), and the :class:`GuardCounts` increments of this
        decision (counted by the caller once its outcome is stored). The device's test
        runs first."""
        counts: dict[str, int] = {}
        if self.guard is not None and st.guard is not None and st.guard.clicks is not None:
            if not self.guard.accept(st.guard.clicks):
                return "device", {"guard_rejected": 1}
            counts["guard_accepted"] = 1
        if decision == cpb.EDIT_DECISION_HOLD:
            counts["fleet_held"] = 1
            return "fleet", counts
        return "", counts

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
                pid, pver, _DTYPE_ENUM[self.config.payload_dtype]
            )
            self.bytes_down += size
            payload, nbytes = reply.edit_payload, len(reply.edit_payload)
        edit, us = await loop.run_in_executor(
            self.executor, _timed, self._decode_edit, payload, False
        )
        self.cache_prototype(key, edit, payload)
        return edit, nbytes, size, us

    def cache_prototype(self, key: tuple[int, int], edit: HeadEdit, payload: bytes) -> None:
        """Keep a prototype version's edit (and payload) in the LRU cache."""
        self._prototypes[key] = edit
        self._prototype_bytes[key] = payload
        while len(self._prototypes) > PROTOTYPE_CACHE:
            old, _ = self._prototypes.popitem(last=False)
            self._prototype_bytes.pop(old, None)

    def _decode_edit(self, payload: bytes, allow_prototype: bool) -> HeadEdit:
        """RSE1 bytes -> a HeadEdit (shapes checked against this ranker's head)."""
        decoded = decode_payload(
            payload, spec=self.ranker.payload_spec, max_rank=self.ranker.bounds.max_rank
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
        """:meth:`_build_edit` and its device compute: (edit, decode us, apply us).

        The fast path: one vectorised decode into a float32 array
        (:func:`decode_values`), then validation and the factored head weights straight
        from it (``Ranker.prepare_decoded``; the prototype's factors are concatenated)."""
        t0 = time.perf_counter()
        decoded = self._decode_values(payload)
        t1 = time.perf_counter()
        prepared = self.ranker.prepare_decoded(decoded, prototype)
        t2 = time.perf_counter()
        return prepared, (t1 - t0) * 1e6, (t2 - t1) * 1e6

    def summary(self, history: list[int]) -> list[float]:
        """The device summary [2D] of ``history`` (:func:`device_summary`)."""
        return device_summary(self.ranker, history, self.config.summary_items)

    # ---- ApplyEdit -----------------------------------------------------------------------------
    async def prepare_pushed(self, payload: bytes, source: str) -> tuple[Any, ...]:
        """Decode and validate a pushed edit off the event loop, without touching any user:
        the arguments of ``UserState.install_edit`` ((None, None) for an empty payload, a
        revert to the base model). The caller installs them with no await in between its
        snapshot of the user and the install, so no concurrent edit request of the same
        user can land in between. An edit that refers to a prototype needs that prototype
        in the device's cache (NotFoundError)."""
        source = source or "push"
        if len(source) > MAX_ID_LEN:
            raise ValidationError(
                f"source label is {len(source)} characters; the limit is {MAX_ID_LEN}"
            )
        if not payload:
            return (None, None)
        loop = asyncio.get_running_loop()
        decoded, pid, pver = await loop.run_in_executor(self.executor, self._decode_pushed, payload)
        proto = None
        if pid is not None:
            proto = self._prototypes.get((pid, pver))
            if proto is None:
                raise NotFoundError(
                    f"the edit refers to prototype {pid} version {pver}, which this device does "
                    "not hold; send an absolute edit or let the device fetch the prototype first"
                )
        prepared = await loop.run_in_executor(
            self.executor, self.ranker.prepare_decoded, decoded, proto
        )  # decoded once: the prototype fields and the build read the same payload
        self._push_counter += 1
        info = EditInfo(
            edit_id=self._push_counter,
            prototype_id=pid or 0,
            prototype_version=pver or 0,
            source=source,
            payload_bytes=len(payload),
            applied_at_ms=int(time.time() * 1000),
        )
        proto_bytes = self._prototype_bytes.get((pid, pver)) if pid is not None else None
        return (prepared, info, payload, proto_bytes)

    def _decode_pushed(self, payload: bytes) -> tuple[DecodedPayload, int | None, int | None]:
        """The decoded payload and its prototype (id, version); reading them runs the
        payload's NaN/Inf check (a pushed edit is always checked)."""
        decoded = self._decode_values(payload)
        return decoded, decoded.prototype_id, decoded.prototype_version

    def _decode_values(self, payload: bytes) -> DecodedPayload:
        """RSE1 bytes -> the decoded values, shapes checked against this ranker's head."""
        return decode_values(
            payload, spec=self.ranker.payload_spec, max_rank=self.ranker.bounds.max_rank
        )
