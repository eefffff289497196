"""What the client returns: plain frozen dataclasses, built from the services' replies.

Names follow ``protos/device/v1/recommendation.proto`` and
``protos/cloud/v1/adaptation.proto`` (read them for each field's meaning); enums become
:class:`ServingMode` / :class:`EditOutcome` members, unset sub-messages become None, and
repeated fields become tuples. Nothing here imports gRPC or protobuf, so results can be
pickled, compared and logged freely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ServingMode(enum.Enum):
    """What a ranking was made with (``recsys.device.v1.ServingMode``)."""

    UNSPECIFIED = "unspecified"
    BASE = "base"  # the base model: no edit yet (or reverted)
    EDITED = "edited"  # the user's latest edit
    FALLBACK_LAST_EDIT = "fallback_last_edit"  # the last edit request failed: last good edit
    FALLBACK_BASE = "fallback_base"  # the last request failed and there is no good edit


class EditOutcome(enum.Enum):
    """What happened to an edit request (``recsys.device.v1.EditOutcome``)."""

    UNSPECIFIED = "unspecified"
    NOT_REQUESTED = "not_requested"  # the gate did not fire (or a static arm / no cloud)
    PENDING = "pending"  # running in the background
    APPLIED = "applied"
    FAILED = "failed"  # cloud slow / unreachable / bad edit: the device falls back
    IN_FLIGHT = "in_flight"  # a request for the user was already running
    HELD = "held"  # received, but a harm guard keeps it out: the user is served the base head


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float  # ranker logit; higher is better


@dataclass(frozen=True)
class EditRef:
    """The edit a user's head carries (``edit_id`` 0 = none)."""

    edit_id: int
    prototype_id: int
    prototype_version: int
    source: str
    payload_bytes: int
    applied_at_ms: int


@dataclass(frozen=True)
class EditCost:
    """One edit request's cost as the device measured it (bytes; cloud ms; device us)."""

    bytes_up: int
    bytes_down: int
    payload_bytes: int
    prototype_bytes: int
    cloud_ms: float
    device_decode_us: float
    device_apply_us: float
    device_states_us: float


@dataclass(frozen=True)
class Recommendation:
    """``Recommend``: ``items`` best first; ``probe_scores`` / ``probe_ranks`` [P] in the
    request's probe order (ranks 1-based, ties pessimistic)."""

    items: tuple[ScoredItem, ...]
    mode: ServingMode
    fallback: bool
    edit: EditRef | None
    note: str
    probe_scores: tuple[float, ...]
    probe_ranks: tuple[int, ...]

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]


@dataclass(frozen=True)
class EventResult:
    """``RecordEvent``: the history length, the gate's decision and the active edit."""

    history_length: int
    shift_score: float
    threshold: float
    edit_requested: bool
    outcome: EditOutcome
    mode: ServingMode
    edit: EditRef | None
    new_user: bool
    cost: EditCost | None  # None: no request made, or still pending
    arm: str


@dataclass(frozen=True)
class EditRequestResult:
    """``RequestEdit``: the outcome, the active edit, and the cost when it finished."""

    outcome: EditOutcome
    mode: ServingMode
    edit: EditRef | None
    cost: EditCost | None
    arm: str


@dataclass(frozen=True)
class AppliedEdit:
    """``ApplyEdit``: the active edit (None after a revert) and the serving mode."""

    edit: EditRef | None
    mode: ServingMode


@dataclass(frozen=True)
class UserStatus:
    """One user's state on a device (``GetStatus`` with a user id)."""

    user_id: str
    history_length: int
    mode: ServingMode
    edit: EditRef | None
    events_since_edit: int
    last_shift_score: float
    bytes_up: int
    bytes_down: int
    note: str
    arm: str
    adaptive: bool
    trigger: str
    gate_budget: float
    gate_threshold: float
    events_since_apply: int
    edit_age_seconds: float
    edit_age_clock: str
    fit_mrr: float
    fit_mean_rank: float
    fit_clicks: int
    guard_clicks: int  # clicks scored by the base head and the candidate edit (harm guard)
    guard_mean_gain_diff: float  # their mean gain(edit) - gain(base); NaN before any
    held_by: str  # who keeps the latest edit out: "device", "fleet", "" = none


@dataclass(frozen=True)
class DeviceStatus:
    """``GetStatus``: readiness, the cloud link, counters; ``user`` when one was asked."""

    ready: bool
    cloud_reachable: bool
    cloud_target: str
    model_version: str
    num_items: int
    num_users: int
    users_with_edit: int
    edit_requests: int
    edit_failures: int
    bytes_up: int
    bytes_down: int
    gate_threshold: float
    gate_budget: float
    last_cloud_ok_ms: int
    user: UserStatus | None
    experiment: str
    max_users: int  # the count cap (bounded memory)
    memory_bytes: int  # estimated bytes the users in memory hold
    max_memory_bytes: int  # the byte cap (0 = none)
    users_evicted: int
    evicted_bytes: int
    users_reloaded: int
    guard_accepted: int  # edits the device's harm guard let through
    guard_rejected: int  # ... and kept out
    fleet_held: int  # edits the cloud's pooled guard said to hold


@dataclass(frozen=True)
class PrototypeRef:
    id: int
    version: int


@dataclass(frozen=True)
class Prototype:
    """A prototype version and its absolute edit (RSE1 bytes)."""

    ref: PrototypeRef
    name: str
    member_count: int
    edit_payload: bytes
    created_at: int


@dataclass(frozen=True)
class PrototypeEntry:
    """One row of ``ListPrototypes`` (no payload)."""

    id: int
    name: str
    current_version: int
    created_at: int


@dataclass(frozen=True)
class GeneratedEdit:
    """``GenerateEdit``: the RSE1 payload (a residual when ``prototype_ref`` is set), its
    edit-log id, the prototype (only when the caller's cached one differs), the generated
    items and tokens (audit), the engine batch and time."""

    edit_payload: bytes
    edit_id: int
    prototype_ref: PrototypeRef | None
    prototype: Prototype | None
    generated_item_ids: tuple[str, ...]
    tokens: str
    batch_size: int
    engine_ms: float
    refined: bool


__all__ = [
    "AppliedEdit",
    "DeviceStatus",
    "EditCost",
    "EditOutcome",
    "EditRef",
    "EditRequestResult",
    "EventResult",
    "GeneratedEdit",
    "Prototype",
    "PrototypeEntry",
    "PrototypeRef",
    "Recommendation",
    "ScoredItem",
    "ServingMode",
    "UserStatus",
]
