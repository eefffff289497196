"""Schema migrations of the prototype store, driven from code (no ``alembic.ini``).

* :func:`upgrade` brings a database to the newest revision (creating the schema on an
  empty one): the only way production code creates tables.
* :func:`current_revision` / :func:`head_revision` / :func:`ensure_current` tell whether a
  database matches the code.
* :func:`schema_diff` compares a database with the models (Alembic autogenerate); empty
  means they agree.
* :func:`revision` writes a new migration script (developers, after changing models).

Example::

    upgrade("sqlite:////tmp/store.sqlite")          # -> "0002"
    current_revision("sqlite:////tmp/store.sqlite")  # -> "0002"
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from codebook.store.db import WRITE_TRANSACTION, make_engine, parse_url
from codebook.store.locks import exclusive, retry_startup
from codebook.store.models import Base
from recsys.errors import RecsysError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# start-up lock (pg_advisory_xact_lock key) held while migrating, so two upgraders never
# race on DDL; the value every released version used, so old and new upgraders exclude
# each other too
MIGRATION_LOCK = 0x5245_4353  # "RECS"


class SchemaOutOfDateError(RecsysError):
    """The database is not at the revision this code expects; run ``recsys db upgrade``."""


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic :class:`Config` for this package's migrations (and ``url``, if given)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        rendered = parse_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


@contextmanager
def _engine_for(target: str | URL | Engine | None) -> Iterator[Engine]:
    """Use ``target`` if it is an engine, else make one (and dispose of it afterwards)."""
    if isinstance(target, Engine):
        yield target
        return
    engine = make_engine(target)
    try:
        yield engine
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest revision in ``migrations/versions``."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships at least one revision
        raise RecsysError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(target: str | URL | Engine | None = None) -> str | None:
    """The revision a database is at (None for an empty, never-migrated database)."""
    with _engine_for(target) as engine, engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(target: str | URL | Engine | None = None, revision: str = "head") -> str | None:
    """Migrate the database at ``target`` (URL, engine, or the configured default) up to
    ``revision``, in one transaction; returns the revision it is at afterwards.

    Safe when several processes (replicas starting together) upgrade one database at
    once: the transaction holds the start-up lock :data:`MIGRATION_LOCK`
    (:func:`codebook.store.locks.exclusive`) from its first statement, so one process
    migrates while the others wait (up to
    :data:`~codebook.store.locks.STARTUP_LOCK_TIMEOUT_S`) and then find the schema at
    ``revision``.
    """
    with _engine_for(target) as engine:
        before, after = retry_startup(
            functools.partial(_upgrade_once, engine, revision), what="schema migration"
        )
    if before != after:
        logger.info("store schema upgraded from %s to %s", before or "(empty)", after)
    return after


def _upgrade_once(engine: Engine, revision: str) -> tuple[str | None, str | None]:
    """One migration transaction under the start-up lock: (revision before, after)."""
    with engine.connect().execution_options(**WRITE_TRANSACTION) as conn, conn.begin():
        exclusive(conn, MIGRATION_LOCK)
        before = MigrationContext.configure(conn).get_current_revision()
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def ensure_current(target: str | URL | Engine | None = None) -> str:
    """Raise :class:`SchemaOutOfDateError` unless the database is at :func:`head_revision`."""
    head = head_revision()
    current = current_revision(target)
    if current != head:
        raise SchemaOutOfDateError(
            f"the store database is at schema revision {current or '(empty)'} but this code "
            f"needs {head}: run `recsys db upgrade` (or codebook.store.migrate.upgrade(url))"
        )
    return current


def schema_diff(target: str | URL | Engine | None = None) -> list[Any]:
    """Differences between the database's schema and the models (empty list: they agree)."""
    with _engine_for(target) as engine, engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def revision(message: str, target: str | URL | Engine | None = None) -> None:
    """Write a new migration script autogenerated against ``target`` (which must be at
    head); read and edit it before committing."""
    with _engine_for(target) as engine, engine.connect() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.revision(cfg, message=message, autogenerate=True)
