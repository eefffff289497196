"""Reserved id blocks: ids handed out before their row is written.

The cloud's write-behind edit log gives each edit its log id before the row is written;
``id_blocks.reserved_to`` is the highest id reserved so far per table, so a restarted
cloud reserves above every id it may have handed out.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "id_blocks",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("reserved_to", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_id_blocks")),
    )


def downgrade() -> None:
    op.drop_table("id_blocks")
