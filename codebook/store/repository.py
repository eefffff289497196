"""Repositories: the store's queries and writes, one class per aggregate.

Each repository wraps a :class:`~sqlalchemy.orm.Session` that the caller has already
opened a transaction on. Repositories ``flush`` (so ids exist and constraints fire) but
never ``commit`` or ``rollback``: the service layer (:mod:`codebook.store.service`) owns one
transaction per use case. Unknown ids raise :class:`recsys.errors.NotFoundError`, bad
inputs :class:`recsys.errors.ValidationError`.

Example::

    with sessions() as session, session.begin():
        repo = PrototypeRepository(session)
        proto = repo.get(prototype_id, lock=True)          # FOR NO KEY UPDATE on PostgreSQL
        latest = repo.version(proto.id, proto.current_version)
        repo.append(proto, latest, VersionContent(code=new_code), reason="refine")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Insert, func, select, update
from sqlalchemy.orm import Session, selectinload

from codebook.store.blobs import encode_array
from codebook.store.models import (
    ArmAssignment,
    DeviceAssignment,
    EditLog,
    Experiment,
    IdBlock,
    Prototype,
    PrototypeTensor,
    PrototypeVersion,
    utcnow,
)
from codebook.store.records import (
    VersionContent,
    check_finite_array,
    check_name,
    check_reason,
    check_stat,
)
from recsys.errors import NotFoundError, ValidationError

logger = logging.getLogger(__name__)


class VersionConflict(Exception):
    """Another writer moved the prototype on first (optimistic refinement); retry."""


def dialect_insert(session: Session, model: type[Any]) -> Insert:
    """``INSERT`` for ``model`` with the backend's ``ON CONFLICT`` support."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(model)
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(model)
    raise ValidationError(f"unsupported database backend {name!r}")  # pragma: no cover


class PrototypeRepository:
    """Prototypes and their immutable versions (code blob + named edit tensors)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # ---- reads ----
    def get(self, prototype_id: int, *, lock: bool = False) -> Prototype:
        """The prototype row; ``lock=True`` takes its row lock until the transaction ends
        (``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL: it serialises refiners but, unlike
        ``FOR UPDATE``, does not block inserts that merely reference the prototype; SQLite
        ignores it and relies on ``BEGIN IMMEDIATE``)."""
        stmt = select(Prototype).where(Prototype.id == prototype_id)
        if lock:
            stmt = stmt.with_for_update(key_share=True).execution_options(populate_existing=True)
        proto = self.session.scalars(stmt).one_or_none()
        if proto is None:
            raise NotFoundError(f"no prototype with id {prototype_id}")
        return proto

    def find(self, name: str) -> Prototype | None:
        return self.session.scalars(select(Prototype).where(Prototype.name == name)).one_or_none()

    def list(self) -> list[Prototype]:
        return list(self.session.scalars(select(Prototype).order_by(Prototype.id)))

    def named(self, prefix: str) -> list[Prototype]:
        """The prototypes whose name starts with ``prefix`` (taken literally: ``%`` and
        ``_`` are escaped), by id."""
        stmt = select(Prototype).where(Prototype.name.startswith(prefix, autoescape=True))
        return list(self.session.scalars(stmt.order_by(Prototype.id)))

    def version(self, prototype_id: int, version: int | None = None) -> PrototypeVersion:
        """A version row (``None``: the current one) with its tensors loaded."""
        if version is None:
            version = self.get(prototype_id).current_version
        stmt = (
            select(PrototypeVersion)
            .where(PrototypeVersion.prototype_id == prototype_id)
            .where(PrototypeVersion.version == version)
            .options(selectinload(PrototypeVersion.tensors), selectinload(PrototypeVersion.parent))
        )
        row = self.session.scalars(stmt).one_or_none()
        if row is None:
            self.get(prototype_id)  # NotFoundError for an unknown prototype first
            raise NotFoundError(f"prototype {prototype_id} has no version {version}")
        return row

    def versions_after(self, prototype_id: int, after: int) -> list[PrototypeVersion]:
        """Versions ``> after`` in ascending order (served by the unique (prototype, version)
        index)."""
        self.get(prototype_id)
        stmt = (
            select(PrototypeVersion)
            .where(PrototypeVersion.prototype_id == prototype_id)
            .where(PrototypeVersion.version > after)
            .order_by(PrototypeVersion.version)
            .options(selectinload(PrototypeVersion.tensors), selectinload(PrototypeVersion.parent))
        )
        return list(self.session.scalars(stmt))

    def count_versions(self, prototype_id: int) -> int:
        stmt = select(func.count()).where(PrototypeVersion.prototype_id == prototype_id)
        return int(self.session.scalar(stmt) or 0)

    # ---- writes ----
    def create(
        self,
        name: str,
        content: VersionContent,
        *,
        reason: str = "init",
        parent: PrototypeVersion | None = None,
    ) -> PrototypeVersion:
        """A new prototype with its version 1 (``reason`` "init", or "split"/"spawn" with
        the ``parent`` version it came from)."""
        check_name("prototype name", name)
        check_reason(reason)
        if reason == "refine":
            raise ValidationError("a new prototype's first version cannot have reason 'refine'")
        if self.find(name) is not None:
            raise ValidationError(f"a prototype named {name!r} already exists")
        proto = Prototype(name=name, current_version=1)
        self.session.add(proto)
        self.session.flush()
        return self._add_version(proto, 1, content, reason=reason, parent=parent)

    def append(
        self,
        proto: Prototype,
        parent: PrototypeVersion,
        content: VersionContent,
        *,
        reason: str = "refine",
        expect_current: bool = False,
    ) -> PrototypeVersion:
        """Append version ``parent.version + 1`` and make it current.

        The caller holds the prototype's lock (pessimistic), or passes
        ``expect_current=True`` (optimistic): then the move of ``current_version`` is a
        conditional UPDATE and :class:`VersionConflict` is raised when another writer got
        there first (the unique (prototype_id, version) constraint also catches it).
        """
        check_reason(reason)
        if reason == "init":
            raise ValidationError("reason 'init' is only for a prototype's first version")
        new_version = parent.version + 1
        row = self._add_version(proto, new_version, content, reason=reason, parent=parent)
        if expect_current:
            result = self.session.execute(
                update(Prototype)
                .where(Prototype.id == proto.id, Prototype.current_version == parent.version)
                .values(current_version=new_version)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                raise VersionConflict(f"prototype {proto.id} moved past version {parent.version}")
            self.session.expire(proto, ["current_version"])
        else:
            proto.current_version = new_version
            self.session.flush()
        return row

    def _add_version(
        self,
        proto: Prototype,
        version: int,
        content: VersionContent,
        *,
        reason: str,
        parent: PrototypeVersion | None,
    ) -> PrototypeVersion:
        code = encode_array(content.code)
        check_finite_array("prototype code", np.frombuffer(code.data, np.dtype(code.dtype)))
        if parent is not None and reason == "refine" and tuple(parent.code_shape) != code.shape:
            raise ValidationError(
                f"refined code has shape {list(code.shape)} but prototype {proto.id} "
                f"has codes of shape {parent.code_shape}"
            )
        inherit = parent is not None and reason == "refine"
        row = PrototypeVersion(
            prototype_id=proto.id,
            version=version,
            code_data=code.data,
            code_dtype=code.dtype,
            code_shape=list(code.shape),
            member_count=_pick(content.member_count, parent, "member_count", inherit, 0),
            residual_norm_mean=_pick(
                content.residual_norm_mean, parent, "residual_norm_mean", inherit, 0.0
            ),
            residual_norm_max=_pick(
                content.residual_norm_max, parent, "residual_norm_max", inherit, 0.0
            ),
            parent_version_id=parent.id if parent is not None else None,
            reason=reason,
        )
        if row.member_count < 0:
            raise ValidationError(f"member_count must be >= 0, got {row.member_count}")
        check_stat("residual_norm_mean", row.residual_norm_mean)
        check_stat("residual_norm_max", row.residual_norm_max)
        if content.tensors is not None:
            row.tensors = _encode_tensors(content.tensors)
        elif inherit and parent is not None:
            row.tensors = [
                PrototypeTensor(name=t.name, data=t.data, dtype=t.dtype, shape=list(t.shape))
                for t in parent.tensors
            ]
        self.session.add(row)
        self.session.flush()
        return row


def _pick(value: Any, parent: PrototypeVersion | None, attr: str, inherit: bool, default: Any):
    if value is not None:
        return value
    if inherit and parent is not None:
        return getattr(parent, attr)
    return default


def _encode_tensors(tensors: Mapping[str, Any]) -> list[PrototypeTensor]:
    rows = []
    for name in sorted(tensors):
        check_name("tensor name", name)
        blob = encode_array(tensors[name])
        check_finite_array(f"edit tensor {name!r}", np.frombuffer(blob.data, np.dtype(blob.dtype)))
        rows.append(
            PrototypeTensor(name=name, data=blob.data, dtype=blob.dtype, shape=list(blob.shape))
        )
    return rows


class DeviceRepository:
    """Which prototype each device belongs to, and the version it last received."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, device_id: str) -> DeviceAssignment:
        row = self.session.get(DeviceAssignment, device_id, populate_existing=True)
        if row is None:
            raise NotFoundError(f"device {device_id!r} is not assigned to a prototype")
        return row

    def assign(
        self, device_id: str, prototype_id: int, seen_version: int | None = None
    ) -> DeviceAssignment:
        """Insert or replace the device's assignment (an upsert: concurrent assigns of the
        same new device do not collide; the last one wins)."""
        check_name("device id", device_id)
        proto = PrototypeRepository(self.session).get(prototype_id)
        if seen_version is not None and not 1 <= seen_version <= proto.current_version:
            raise ValidationError(
                f"seen_version {seen_version} is outside prototype {prototype_id}'s versions "
                f"1..{proto.current_version}"
            )
        now = utcnow()
        stmt = dialect_insert(self.session, DeviceAssignment).values(
            device_id=device_id,
            prototype_id=prototype_id,
            assigned_at=now,
            seen_version=seen_version,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[DeviceAssignment.device_id],
            set_={"prototype_id": prototype_id, "assigned_at": now, "seen_version": seen_version},
        )
        self.session.execute(stmt)
        return self.get(device_id)

    def mark_seen(self, device_id: str, version: int) -> DeviceAssignment:
        row = self.get(device_id)
        current = PrototypeRepository(self.session).get(row.prototype_id).current_version
        if not 1 <= version <= current:
            raise ValidationError(
                f"version {version} is outside prototype {row.prototype_id}'s versions 1..{current}"
            )
        row.seen_version = version
        self.session.flush()
        return row


EDIT_LOG_IDS = "edit_log"  # the id block of the edit log's row ids
# tables whose ids are reserved in blocks: the floor of a first reservation (rows that
# were written before reservations existed)
_RESERVED_IDS = {EDIT_LOG_IDS: EditLog.id}


class IdBlockRepository:
    """Blocks of ids handed out before their rows are written (``id_blocks``).

    :meth:`reserve` locks the block's row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite
    callers open a write transaction) and moves ``reserved_to`` up, so concurrent or
    restarted reservers never get the same id. Ids are increasing, not dense: an unused
    rest of a block is skipped after a restart.
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def reserve(self, name: str, count: int, *, above: int = 0) -> tuple[int, int]:
        """(first, last) of ``count`` new ids of ``name``, all > ``above``, > every id
        reserved before and > the table's largest id."""
        if count < 1:
            raise ValidationError(f"count must be >= 1, got {count}")
        column = _RESERVED_IDS.get(name)
        if column is None:
            raise ValidationError(f"no reserved id block {name!r}; one of {list(_RESERVED_IDS)}")
        self.session.execute(
            dialect_insert(self.session, IdBlock)
            .values(name=name, reserved_to=0)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        row = self.session.scalars(
            select(IdBlock)
            .where(IdBlock.name == name)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one()
        largest = int(self.session.scalar(select(func.max(column))) or 0)
        first = max(int(row.reserved_to), largest, int(above)) + 1
        row.reserved_to = first + count - 1
        self.session.flush()
        return first, first + count - 1


class EditLogRepository:
    """The audit log of generated edits."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self,
        *,
        device_id: str,
        tokens: str,
        prototype_id: int | None,
        prototype_version: int | None,
        edit_norm: float,
        payload_bytes: int,
        latency_ms: float,
        created_at: datetime | None = None,
        id: int | None = None,
    ) -> EditLog:
        """Append a row; ``id``: one reserved with :class:`IdBlockRepository` (None: the
        next one reserved here, so ids never collide with reserved ones)."""
        check_name("device id", device_id)
        if prototype_id is not None:
            PrototypeRepository(self.session).get(prototype_id)
        if payload_bytes < 0:
            raise ValidationError(f"payload_bytes must be >= 0, got {payload_bytes}")
        if id is None:
            id = IdBlockRepository(self.session).reserve(EDIT_LOG_IDS, 1)[0]
        row = EditLog(
            id=int(id),
            device_id=device_id,
            tokens=tokens,
            prototype_id=prototype_id,
            prototype_version=prototype_version,
            edit_norm=check_stat("edit_norm", edit_norm),
            payload_bytes=int(payload_bytes),
            latency_ms=check_stat("latency_ms", latency_ms),
            created_at=created_at or utcnow(),
        )
        self.session.add(row)
        self.session.flush()
        return row

    def for_device(self, device_id: str, limit: int = 100) -> list[EditLog]:
        """The device's most recent edits, newest first (index on (device_id, created_at))."""
        stmt = (
            select(EditLog)
            .where(EditLog.device_id == device_id)
            .order_by(EditLog.created_at.desc(), EditLog.id.desc())
            .limit(limit)
        )
        return list(self.session.scalars(stmt))


class ExperimentRepository:
    """A/B experiments and their persisted user -> arm assignments."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, experiment_id: int) -> Experiment:
        row = self.session.get(Experiment, experiment_id)
        if row is None:
            raise NotFoundError(f"no experiment with id {experiment_id}")
        return row

    def find(self, name: str) -> Experiment | None:
        return self.session.scalars(select(Experiment).where(Experiment.name == name)).one_or_none()

    def create(self, name: str, salt: str, config: Mapping[str, Any]) -> Experiment:
        check_name("experiment name", name)
        check_name("experiment salt", salt)
        if self.find(name) is not None:
            raise ValidationError(f"an experiment named {name!r} already exists")
        row = Experiment(name=name, salt=salt, config=dict(config))
        self.session.add(row)
        self.session.flush()
        return row

    def get_arm(self, experiment_id: int, user_id: str) -> ArmAssignment | None:
        stmt = select(ArmAssignment).where(
            ArmAssignment.experiment_id == experiment_id, ArmAssignment.user_id == user_id
        )
        return self.session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()

    def get_or_create_arm(
        self, experiment_id: int, user_id: str, arm: str
    ) -> tuple[ArmAssignment, bool]:
        """The user's persisted arm, inserting ``arm`` if there is none yet.

        Race-safe: ``INSERT ... ON CONFLICT (experiment_id, user_id) DO NOTHING`` lets the
        unique constraint pick one winner among concurrent callers (PostgreSQL makes the
        loser wait for the winner's commit); everyone then reads the same row. Returns
        ``(row, created)``.
        """
        check_name("user id", user_id)
        check_name("arm", arm)
        existing = self.get_arm(experiment_id, user_id)
        if existing is not None:
            return existing, False
        self.get(experiment_id)
        stmt = (
            dialect_insert(self.session, ArmAssignment)
            .values(experiment_id=experiment_id, user_id=user_id, arm=arm, assigned_at=utcnow())
            .on_conflict_do_nothing(index_elements=["experiment_id", "user_id"])
            .returning(ArmAssignment.id)
        )
        created = self.session.execute(stmt).first() is not None  # no row: someone else won
        row = self.get_arm(experiment_id, user_id)
        if row is None:  # pragma: no cover - the insert or the winner's row must be visible
            raise RuntimeError(f"arm assignment for {user_id!r} vanished")
        return row, created

    def arm_counts(self, experiment_id: int) -> dict[str, int]:
        """Users per arm (for the sample-ratio-mismatch check)."""
        self.get(experiment_id)
        stmt = (
            select(ArmAssignment.arm, func.count())
            .where(ArmAssignment.experiment_id == experiment_id)
            .group_by(ArmAssignment.arm)
            .order_by(ArmAssignment.arm)
        )
        return {arm: int(n) for arm, n in self.session.execute(stmt)}
