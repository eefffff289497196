"""Initial schema of the prototype store.

Prototypes with their versions and tensors, device assignments, the edit log, experiments
and arm assignments.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Types are spelled out here (no imports from ``codebook.store.models``), so this script
keeps creating the same schema when the models move on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("salt", sa.String(length=200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
        sa.UniqueConstraint("name", name=op.f("uq_experiments_name")),
    )
    op.create_table(
        "prototypes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        _timestamp("created_at"),
        sa.Column("current_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prototypes")),
        sa.UniqueConstraint("name", name=op.f("uq_prototypes_name")),
    )
    op.create_table(
        "arm_assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("arm", sa.String(length=100), nullable=False),
        _timestamp("assigned_at"),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_arm_assignments_experiment_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_arm_assignments")),
        sa.UniqueConstraint(
            "experiment_id", "user_id", name=op.f("uq_arm_assignments_experiment_id_user_id")
        ),
    )
    op.create_index(
        "ix_arm_assignments_experiment_id_arm", "arm_assignments", ["experiment_id", "arm"]
    )
    op.create_table(
        "device_assignments",
        sa.Column("device_id", sa.String(length=200), nullable=False),
        sa.Column("prototype_id", sa.Integer(), nullable=False),
        _timestamp("assigned_at"),
        sa.Column("seen_version", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["prototype_id"],
            ["prototypes.id"],
            name=op.f("fk_device_assignments_prototype_id_prototypes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_assignments")),
    )
    op.create_index(
        op.f("ix_device_assignments_prototype_id"), "device_assignments", ["prototype_id"]
    )
    op.create_table(
        "edit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=200), nullable=False),
        sa.Column("tokens", sa.Text(), nullable=False),
        sa.Column("prototype_id", sa.Integer(), nullable=True),
        sa.Column("prototype_version", sa.Integer(), nullable=True),
        sa.Column("edit_norm", sa.Float(), nullable=False),
        sa.Column("payload_bytes", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["prototype_id"],
            ["prototypes.id"],
            name=op.f("fk_edit_log_prototype_id_prototypes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_edit_log")),
    )
    op.create_index(op.f("ix_edit_log_created_at"), "edit_log", ["created_at"])
    op.create_index("ix_edit_log_device_id_created_at", "edit_log", ["device_id", "created_at"])
    op.create_index(
        "ix_edit_log_prototype_id_created_at", "edit_log", ["prototype_id", "created_at"]
    )
    op.create_table(
        "prototype_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prototype_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("code_data", sa.LargeBinary(), nullable=False),
        sa.Column("code_dtype", sa.String(length=16), nullable=False),
        sa.Column("code_shape", sa.JSON(), nullable=False),
        sa.Column("member_count", sa.Integer(), nullable=False),
        sa.Column("residual_norm_mean", sa.Float(), nullable=False),
        sa.Column("residual_norm_max", sa.Float(), nullable=False),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(length=16), nullable=False),
        _timestamp("created_at"),
        sa.CheckConstraint(
            "reason IN ('init', 'refine', 'split', 'spawn')",
            name=op.f("ck_prototype_versions_reason"),
        ),
        sa.CheckConstraint(
            "member_count >= 0", name=op.f("ck_prototype_versions_member_count_nonnegative")
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_prototype_versions_version_positive")),
        sa.ForeignKeyConstraint(
            ["parent_version_id"],
            ["prototype_versions.id"],
            name=op.f("fk_prototype_versions_parent_version_id_prototype_versions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["prototype_id"],
            ["prototypes.id"],
            name=op.f("fk_prototype_versions_prototype_id_prototypes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prototype_versions")),
        sa.UniqueConstraint(
            "prototype_id", "version", name=op.f("uq_prototype_versions_prototype_id_version")
        ),
    )
    op.create_index(
        op.f("ix_prototype_versions_parent_version_id"),
        "prototype_versions",
        ["parent_version_id"],
    )
    op.create_table(
        "prototype_tensors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["prototype_versions.id"],
            name=op.f("fk_prototype_tensors_version_id_prototype_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prototype_tensors")),
        sa.UniqueConstraint(
            "version_id", "name", name=op.f("uq_prototype_tensors_version_id_name")
        ),
    )


def downgrade() -> None:
    op.drop_table("prototype_tensors")
    op.drop_index(op.f("ix_prototype_versions_parent_version_id"), "prototype_versions")
    op.drop_table("prototype_versions")
    op.drop_index("ix_edit_log_prototype_id_created_at", "edit_log")
    op.drop_index("ix_edit_log_device_id_created_at", "edit_log")
    op.drop_index(op.f("ix_edit_log_created_at"), "edit_log")
    op.drop_table("edit_log")
    op.drop_index(op.f("ix_device_assignments_prototype_id"), "device_assignments")
    op.drop_table("device_assignments")
    op.drop_index("ix_arm_assignments_experiment_id_arm", "arm_assignments")
    op.drop_table("arm_assignments")
    op.drop_table("prototypes")
    op.drop_table("experiments")
