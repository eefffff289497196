"""Which database errors are worth a fresh transaction: :func:`is_transient`.

Shared by the use cases (:mod:`codebook.store.service`), the write-behind writer and the
start-up paths (:mod:`codebook.store.locks`: migrations and prototype seeding), so they
all retry the same things: lock timeouts, deadlocks, serialization failures, SQLite's
"database is locked", dropped connections and, where asked, unique-constraint
violations from a concurrent writer.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy.exc import DBAPIError

from codebook.store.repository import VersionConflict

# PostgreSQL SQLSTATEs worth retrying: serialization failure, deadlock, lock not available
PG_TRANSIENT = frozenset({"40001", "40P01", "55P03"})
PG_UNIQUE_VIOLATION = "23505"
# SQLite primary result codes: BUSY, LOCKED; extended codes of a UNIQUE / PK violation
SQLITE_TRANSIENT = frozenset({5, 6})
SQLITE_UNIQUE = frozenset({2067, 1555})


def is_transient(exc: BaseException, *, unique_conflicts: bool = False) -> bool:
    """True when ``exc`` is a database error that a fresh transaction may not hit again:
    lock timeouts, deadlocks, serialization failures, dropped connections, and (with
    ``unique_conflicts``) unique-constraint violations from a concurrent writer."""
    if isinstance(exc, VersionConflict):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in PG_TRANSIENT or (unique_conflicts and sqlstate == PG_UNIQUE_VIOLATION)
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        if code is None:
            return False
        return (code & 0xFF) in SQLITE_TRANSIENT or (unique_conflicts and code in SQLITE_UNIQUE)
    return False
