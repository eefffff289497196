"""Plain records the store hands out and takes in (no ORM objects cross the service edge).

Shapes: C = code dimension (the prototype's edit code); each edit tensor has its own shape.

* :class:`VersionContent`: what a version holds (code, edit tensors, member statistics);
  callers build one to create a prototype and return one from a refine update function.
* :class:`PrototypeState`: one stored version, decoded (numpy arrays).
* :class:`PrototypeInfo`, :class:`DeviceAssignmentRecord`, :class:`EditRecord`,
  :class:`ExperimentRecord`, :class:`ArmAssignmentRecord`: rows as frozen dataclasses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from codebook.store.blobs import decode_array
from codebook.store.models import (
    VERSION_REASONS,
    ArmAssignment,
    DeviceAssignment,
    EditLog,
    Experiment,
    Prototype,
    PrototypeVersion,
)
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

MAX_NAME = 200


@dataclass(frozen=True)
class VersionContent:
    """The content of a prototype version.

    Args:
        code: the prototype's edit code, float array [C] (or any fixed shape).
        tensors: named edit tensors (``"layer0.U"`` -> array). In a refine update, None
            keeps the parent version's tensors unchanged.
        member_count: devices counted into this version (None in a refine: keep parent's).
        residual_norm_mean: mean of the members' residual norms (None: keep parent's).
        residual_norm_max: max of the members' residual norms (None: keep parent's).
    """

    code: Any
    tensors: Mapping[str, Any] | None = None
    member_count: int | None = None
    residual_norm_mean: float | None = None
    residual_norm_max: float | None = None


@dataclass(frozen=True)
class VersionRef:
    """A (prototype, version) pair, e.g. the parent a version was derived from."""

    prototype_id: int
    version: int


@dataclass(frozen=True)
class PrototypeState:
    """One version of a prototype with its arrays decoded (numpy, writable copies)."""

    prototype_id: int
    name: str
    version: int
    code: np.ndarray
    tensors: dict[str, np.ndarray]
    member_count: int
    residual_norm_mean: float
    residual_norm_max: float
    reason: str
    parent: VersionRef | None
    created_at: datetime


# A refine step: latest state -> content of the next version. It may run more than once
# when a transaction is retried, so it must not have side effects.
UpdateFn = Callable[[PrototypeState], VersionContent]


@dataclass(frozen=True)
class PrototypeInfo:
    """A prototype without its arrays (for listings)."""

    id: int
    name: str
    current_version: int
    created_at: datetime


@dataclass(frozen=True)
class DeviceAssignmentRecord:
    device_id: str
    prototype_id: int
    assigned_at: datetime
    seen_version: int | None


@dataclass(frozen=True)
class EditRecord:
    id: int
    device_id: str
    tokens: str
    prototype_id: int | None
    prototype_version: int | None
    edit_norm: float
    payload_bytes: int
    latency_ms: float
    created_at: datetime


@dataclass(frozen=True)
class ExperimentRecord:
    id: int
    name: str
    salt: str
    config: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(frozen=True)
class ArmAssignmentRecord:
    """A user's arm; ``created`` is False when the assignment already existed."""

    experiment_id: int
    user_id: str
    arm: str
    assigned_at: datetime
    created: bool


# ---- validation -----------------------------------------------------------------------------
def check_name(what: str, value: str) -> str:
    """A non-empty string of at most :data:`MAX_NAME` characters."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME:
        raise ValidationError(f"{what} is {len(value)} characters long; the limit is {MAX_NAME}")
    return value


def check_reason(reason: str) -> str:
    if reason not in VERSION_REASONS:
        raise ValidationError(f"version reason {reason!r} is not one of {list(VERSION_REASONS)}")
    return reason


def check_finite_array(what: str, array: np.ndarray) -> None:
    """Reject NaN/Inf in float/complex arrays: one bad prototype would poison its devices."""
    if array.dtype.kind in "fc" and array.size and not np.isfinite(array).all():
        raise ValidationError(f"{what} contains NaN or Inf values")


def check_stat(what: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValidationError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


# ---- ORM -> records -------------------------------------------------------------------------
def prototype_state(proto: Prototype, row: PrototypeVersion) -> PrototypeState:
    """Decode ``row`` (a version of ``proto``; its tensors and parent must be loadable)."""
    tensors = {
        t.name: decode_array(t.data, t.dtype, t.shape)
        for t in row.tensors  # ordered by name
    }
    parent = row.parent
    return PrototypeState(
        prototype_id=proto.id,
        name=proto.name,
        version=row.version,
        code=decode_array(row.code_data, row.code_dtype, row.code_shape),
        tensors=tensors,
        member_count=row.member_count,
        residual_norm_mean=row.residual_norm_mean,
        residual_norm_max=row.residual_norm_max,
        reason=row.reason,
        parent=VersionRef(parent.prototype_id, parent.version) if parent is not None else None,
        created_at=row.created_at,
    )


def prototype_info(proto: Prototype) -> PrototypeInfo:
    return PrototypeInfo(proto.id, proto.name, proto.current_version, proto.created_at)


def device_record(row: DeviceAssignment) -> DeviceAssignmentRecord:
    return DeviceAssignmentRecord(
        row.device_id, row.prototype_id, row.assigned_at, row.seen_version
    )


def edit_record(row: EditLog) -> EditRecord:
    return EditRecord(
        id=row.id,
        device_id=row.device_id,
        tokens=row.tokens,
        prototype_id=row.prototype_id,
        prototype_version=row.prototype_version,
        edit_norm=row.edit_norm,
        payload_bytes=row.payload_bytes,
        latency_ms=row.latency_ms,
        created_at=row.created_at,
    )


def experiment_record(row: Experiment) -> ExperimentRecord:
    return ExperimentRecord(row.id, row.name, row.salt, dict(row.config or {}), row.created_at)


def arm_record(row: ArmAssignment, created: bool) -> ArmAssignmentRecord:
    return ArmAssignmentRecord(row.experiment_id, row.user_id, row.arm, row.assigned_at, created)
