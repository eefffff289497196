"""The prototype store's schema: SQLAlchemy 2.0 typed models.

Tables (one class each)::

    prototypes                  id, name (unique), created_at, current_version
    prototype_versions          id, prototype_id -> prototypes, version, code blob,
                                member_count, residual norm stats, parent_version_id ->
                                prototype_versions, reason, created_at;
                                unique (prototype_id, version)
    prototype_tensors           id, version_id -> prototype_versions, name, tensor blob;
                                unique (version_id, name)  -- the edit tensors of a version
    device_assignments          device_id (pk), prototype_id -> prototypes, assigned_at,
                                seen_version
    edit_log                    id, device_id, tokens, prototype_id -> prototypes,
                                prototype_version, edit_norm, payload_bytes, latency_ms,
                                created_at
    experiments                 id, name (unique), salt, config (JSON), created_at
    arm_assignments             id, experiment_id -> experiments, user_id, arm, assigned_at;
                                unique (experiment_id, user_id)
    id_blocks                   name (pk), reserved_to  -- ids handed out before their row
                                is written (edit ids of the write-behind edit log)

A version row is immutable once written: refining a prototype appends version ``v + 1``
and moves ``prototypes.current_version``. The unique ``(prototype_id, version)``
constraint is the last line of defence against two writers producing the same version.

The schema is created by the Alembic migrations in ``codebook/store/migrations``;
``Base.metadata.create_all`` is for tests only. A test checks the two agree.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

logger = logging.getLogger(__name__)

# Constraint names are fixed by convention, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Why a version exists (prototype_versions.reason).
VERSION_REASONS = ("init", "refine", "split", "spawn")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of datetime the store keeps)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that always hands back aware UTC datetimes.

    PostgreSQL keeps the zone; SQLite keeps text without one, so naive values read back
    are UTC by construction (only aware values are accepted on the way in).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the store: one ``MetaData`` with the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Prototype(Base):
    """A shared edit that a group of similar devices starts from; versioned."""

    __tablename__ = "prototypes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the latest committed version; refinement moves it under a row lock
    current_version: Mapped[int] = mapped_column(Integer, default=1)

    versions: Mapped[list[PrototypeVersion]] = relationship(
        back_populates="prototype",
        order_by="PrototypeVersion.version",
        passive_deletes=True,
    )

    def __repr__(self) -> str:
        return f"Prototype(id={self.id!r}, name={self.name!r}, v{self.current_version!r})"


class PrototypeVersion(Base):
    """One immutable state of a prototype: its code vector, edit tensors and member stats."""

    __tablename__ = "prototype_versions"
    __table_args__ = (
        UniqueConstraint("prototype_id", "version"),
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint("member_count >= 0", name="member_count_nonnegative"),
        CheckConstraint(
            "reason IN (" + ", ".join(f"'{r}'" for r in VERSION_REASONS) + ")", name="reason"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prototype_id: Mapped[int] = mapped_column(ForeignKey("prototypes.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    # the prototype's edit code (running mean of its members' codes): raw bytes + dtype + shape
    code_data: Mapped[bytes] = mapped_column(LargeBinary)
    code_dtype: Mapped[str] = mapped_column(String(16))
    code_shape: Mapped[list[int]] = mapped_column(JSON)
    member_count: Mapped[int] = mapped_column(Integer, default=0)
    # statistics of the members' residual norms (|device edit - prototype edit|): what the
    # split/spawn rule watches
    residual_norm_mean: Mapped[float] = mapped_column(Float, default=0.0)
    residual_norm_max: Mapped[float] = mapped_column(Float, default=0.0)
    # the version this one was derived from (None for "init"); for "split"/"spawn" it may
    # belong to another prototype
    parent_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("prototype_versions.id", ondelete="SET NULL"), index=True
    )
    reason: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    prototype: Mapped[Prototype] = relationship(back_populates="versions")
    tensors: Mapped[list[PrototypeTensor]] = relationship(
        back_populates="version_row",
        order_by="PrototypeTensor.name",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    parent: Mapped[PrototypeVersion | None] = relationship(remote_side=[id])

    def __repr__(self) -> str:
        return f"PrototypeVersion(prototype_id={self.prototype_id!r}, version={self.version!r})"


class PrototypeTensor(Base):
    """One named edit tensor of a prototype version (e.g. ``layer0.U``, ``layer0.bias``)."""

    __tablename__ = "prototype_tensors"
    __table_args__ = (UniqueConstraint("version_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("prototype_versions.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[int]] = mapped_column(JSON)

    version_row: Mapped[PrototypeVersion] = relationship(back_populates="tensors")


class DeviceAssignment(Base):
    """Which prototype a device belongs to now, and the version it last received."""

    __tablename__ = "device_assignments"

    device_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    prototype_id: Mapped[int] = mapped_column(
        ForeignKey("prototypes.id", ondelete="CASCADE"), index=True
    )
    assigned_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_version: Mapped[int | None] = mapped_column(Integer)


class EditLog(Base):
    """Audit record of one generated edit: who asked, what the LLM said, what was sent."""

    __tablename__ = "edit_log"
    __table_args__ = (
        Index("ix_edit_log_device_id_created_at", "device_id", "created_at"),
        Index("ix_edit_log_prototype_id_created_at", "prototype_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(200))
    # the codebook tokens the LLM emitted, space separated
    tokens: Mapped[str] = mapped_column(Text)
    prototype_id: Mapped[int | None] = mapped_column(
        ForeignKey("prototypes.id", ondelete="SET NULL")
    )
    prototype_version: Mapped[int | None] = mapped_column(Integer)
    edit_norm: Mapped[float] = mapped_column(Float)
    payload_bytes: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class IdBlock(Base):
    """The highest id reserved so far for a table whose ids are handed out before the row
    is written (the edit log's, under write-behind): every id <= ``reserved_to`` may be in
    use, so a restarted writer reserves above it."""

    __tablename__ = "id_blocks"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    reserved_to: Mapped[int] = mapped_column(BigInteger)


class Experiment(Base):
    """An A/B experiment: its arms and split live in ``config``; ``salt`` seeds the hash."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    salt: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    assignments: Mapped[list[ArmAssignment]] = relationship(
        back_populates="experiment", passive_deletes=True
    )


class ArmAssignment(Base):
    """The arm a user was put in for an experiment; written once, never changed."""

    __tablename__ = "arm_assignments"
    __table_args__ = (
        UniqueConstraint("experiment_id", "user_id"),
        # arm counts per experiment (sample-ratio-mismatch check)
        Index("ix_arm_assignments_experiment_id_arm", "experiment_id", "arm"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(200))
    arm: Mapped[str] = mapped_column(String(100))
    assigned_at: Mapped[datetime] = mapped_column(default=utcnow)

    experiment: Mapped[Experiment] = relationship(back_populates="assignments")
