"""Alembic environment of the prototype store.

Run by Alembic, not imported. The caller (:mod:`codebook.store.migrate`) passes an open
connection in ``config.attributes["connection"]`` so the migration shares its engine
settings (SQLite pragmas, write lock); without one, the URL in the ``sqlalchemy.url``
option is used. Offline mode (``--sql``) renders the SQL for that URL's dialect.
"""

from __future__ import annotations

import logging

from alembic import context
from sqlalchemy.engine import Connection

from codebook.store.models import Base

logger = logging.getLogger(__name__)

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: later migrations run as copy-and-move batches
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from codebook.store.db import make_engine  # only when no connection was passed

    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
