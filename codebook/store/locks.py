"""Start-up work that exactly one of several processes may do at a time: schema
migration and the first prototype seeding, when replicas start together on one store.

* :func:`exclusive` serialises the caller's transaction against every other transaction
  that calls it with the same key. PostgreSQL: ``pg_advisory_xact_lock(key)``, released
  at commit or rollback, waited for up to ``timeout_s`` (``SET LOCAL lock_timeout``: the
  store's connections otherwise give up on any lock, advisory ones included, after
  :data:`~codebook.store.db.PG_LOCK_TIMEOUT_S` = 0.25 s, shorter than a migration).
  SQLite: the transaction must be a write transaction (``BEGIN IMMEDIATE``), which
  already excludes every other writer of the file; there is nothing more to take.
* :func:`retry_startup` runs a whole transaction again on transient errors (a SQLite
  writer that waited past its 0.25 s busy timeout, a PostgreSQL deadlock or lock
  timeout) for up to ``timeout_s``; a caller that gets the lock after another process
  did the work finds it done.
* :func:`lock_key` turns a name into a stable signed 64-bit advisory-lock key.

Example::

    def once() -> None:
        with engine.connect().execution_options(**WRITE_TRANSACTION) as conn, conn.begin():
            exclusive(conn, lock_key("seed prototypes tiny"))
            ...  # check, then create: no other process is between the two

    retry_startup(once, what="seeding prototypes")
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Connection
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from codebook.store.transient import is_transient
from recsys.errors import RecsysError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a starting process waits for another one's migration or seeding to finish
# (PostgreSQL lock wait; SQLite retries of BEGIN IMMEDIATE) before it gives up.
STARTUP_LOCK_TIMEOUT_S = 120.0


class StartupLockTimeout(RecsysError):
    """Another process held the store's start-up lock for longer than the timeout."""


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` (the first 8 bytes of
    ``blake2b(name)``), the same in every process and Python version."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def exclusive(conn: Connection, key: int, *, timeout_s: float = STARTUP_LOCK_TIMEOUT_S) -> None:
    """Hold the start-up lock ``key`` until ``conn``'s transaction ends (see the module
    doc). Call it first in the transaction, before reading what it protects."""
    if conn.dialect.name == "postgresql":
        # SET cannot take bind parameters; the value is a formatted int, never user text
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(timeout_s * 1000))}")
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": int(key)})
        return
    if not conn.get_execution_options().get("recsys_write_transaction", False):
        raise RecsysError(
            "exclusive() on SQLite needs a write transaction (BEGIN IMMEDIATE): open it "
            "with the WRITE_TRANSACTION execution option"
        )


def retry_startup(
    fn: Callable[[], T], *, what: str, timeout_s: float = STARTUP_LOCK_TIMEOUT_S
) -> T:
    """``fn()``, run again on transient database errors for up to ``timeout_s``;
    :class:`StartupLockTimeout` after that. ``fn`` must be one whole transaction."""

    def note(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        level = logging.INFO if state.attempt_number == 1 else logging.DEBUG
        logger.log(level, "%s: waiting for another process (attempt %d: %s)", what,
                   state.attempt_number, exc)  # fmt: skip

    retrying = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_random_exponential(multiplier=0.005, max=0.1),
        retry=retry_if_exception(is_transient),
        before_sleep=note,
    )
    try:
        return retrying(fn)
    except RetryError as err:
        raise StartupLockTimeout(
            f"{what}: another process kept the store locked for more than {timeout_s:.0f} s"
        ) from err.last_attempt.exception()
