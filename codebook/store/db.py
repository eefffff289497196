"""Engines and sessions for the prototype store: SQLite (embedded default) or PostgreSQL.

``make_engine(url)`` accepts:

* ``sqlite:///PATH``: a file database. Every connection gets WAL journaling (readers never
  block the writer), foreign keys on, ``synchronous=NORMAL`` (safe with WAL: a power cut
  may lose the last commits, never corrupts) and a busy timeout. SQLAlchemy, not the
  ``sqlite3`` module, emits ``BEGIN``, so a transaction opened with the
  :data:`WRITE_TRANSACTION` execution option starts with ``BEGIN IMMEDIATE``: it takes
  the database's single write lock before its first read, which is what makes
  read-modify-write use cases (refining a prototype) lose no update.
* ``postgresql+psycopg://USER[:PASSWORD]@HOST:PORT/DB`` (psycopg 3): the production
  database. Read-modify-write use cases lock the rows they change with
  ``SELECT ... FOR UPDATE``; the execution option is ignored.

With no URL, :func:`recsys.settings.database_url` decides (``$RECSYS_DATABASE_URL``, else
``CACHE_DIR/store.sqlite``).

Example::

    engine = make_engine("sqlite:////tmp/store.sqlite")
    sessions = make_sessionmaker(engine)
    with sessions() as session, session.begin():
        session.connection(execution_options=WRITE_TRANSACTION)  # BEGIN IMMEDIATE on SQLite
        ...
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from recsys import settings
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

# Execution option that marks a transaction as a writer (BEGIN IMMEDIATE on SQLite).
WRITE_TRANSACTION: dict[str, Any] = {"recsys_write_transaction": True}
# How long a SQLite writer waits for the write lock before "database is locked" (then
# the use case's tenacity retry takes over), and how long a PostgreSQL statement waits for
# a row lock (lock_timeout, SQLSTATE 55P03, retried the same way). Well under the device's
# 1 s GenerateEdit deadline: a stalled lock shows up as a retry or a StoreBusyError,
# never as a request stuck for half a minute.
SQLITE_BUSY_TIMEOUT_S = 0.25
PG_LOCK_TIMEOUT_S = 0.25
SUPPORTED = "sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB"


def parse_url(url: str | URL | None = None) -> URL:
    """``url`` (or the configured default) as a SQLAlchemy :class:`URL`, checked to be a
    SQLite file or a PostgreSQL database; raises :class:`ValidationError` otherwise."""
    raw = url if url is not None else settings.database_url()
    try:
        parsed = make_url(raw)
    except ArgumentError as exc:
        raise ValidationError(f"bad database URL {raw!r}: {exc}; use {SUPPORTED}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ValidationError(
                "the store needs a SQLite *file* (in-memory databases are private to one "
                f"connection); use {SUPPORTED}"
            )
    elif backend == "postgresql":
        if parsed.drivername == "postgresql":  # explicit: the driver we install is psycopg 3
            parsed = parsed.set(drivername="postgresql+psycopg")
    else:
        raise ValidationError(f"unsupported database {backend!r} in URL; use {SUPPORTED}")
    return parsed


def make_engine(
    url: str | URL | None = None,
    *,
    echo: bool = False,
    sqlite_busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S,
    pg_lock_timeout_s: float = PG_LOCK_TIMEOUT_S,
    **kwargs: Any,
) -> Engine:
    """An :class:`Engine` for ``url`` with the store's per-backend settings.

    ``sqlite_busy_timeout_s``: how long a SQLite connection waits for a lock before
    "database is locked"; ``pg_lock_timeout_s``: PostgreSQL's ``lock_timeout`` (0 = wait
    forever). Extra keyword arguments go to :func:`sqlalchemy.create_engine`
    (e.g. ``pool_size``). The parent folder of a SQLite file is created if missing.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": sqlite_busy_timeout_s, "check_same_thread": False}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(parsed, echo=echo, connect_args=connect_args, **kwargs)
        _install_sqlite_hooks(engine, sqlite_busy_timeout_s)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        connect_args = {"options": f"-c lock_timeout={int(pg_lock_timeout_s * 1000)}"}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(parsed, echo=echo, connect_args=connect_args, **kwargs)
    logger.debug("store engine %s", parsed.render_as_string(hide_password=True))
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Session factory bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def _install_sqlite_hooks(engine: Engine, busy_timeout_s: float) -> None:
    """Pragmas on every new connection, and SQLAlchemy-controlled ``BEGIN``.

    The ``sqlite3`` module (Python < 3.12 legacy mode) would otherwise start transactions
    late (only before INSERT/UPDATE/DELETE), so a read-then-write transaction could read a
    stale snapshot; see the SQLAlchemy SQLite dialect notes on transaction control.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("recsys_write_transaction", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
