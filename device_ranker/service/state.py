"""Durable device state: every acknowledged event and each user's active edit, in a local
SQLite file, so a device server that crashes (SIGKILL, OOM) or restarts comes back with
its users as they were: :class:`DeviceStateStore`.

What is written, and when:

* **an event** (RecordEvent): one row ``(user, position, item id, timestamp)``, committed
  *before* the call is acknowledged (the event is applied in memory only after the commit;
  a failed write fails the call with UNAVAILABLE and changes nothing);
* **a user's snapshot**: its history (item ids and times, at most ``history_len``), the
  items it has seen and its position, written when the user first becomes durable (its
  first event, edit or eviction: a user seeded from the dataset keeps its seeded history)
  and again every ``history_len`` events, when the older event rows are deleted (so a user
  holds at most one snapshot and ``history_len`` event rows);
* **the active edit**: its RSE1 payload, the prototype's own payload when the edit is a
  residual, and its id, prototype id / version, source, model version; rewritten when an
  edit is installed or reverted.

Item ids (not the ranker's indices) are stored, so a state file survives a catalogue
re-index; an edit stored for another ranker (model version) is dropped on load.

**Synchronous mode.** The file is in WAL mode. ``sync="normal"`` (the default,
``PRAGMA synchronous=NORMAL``): a commit is in the WAL when the call returns, so it
survives the *process* being killed at any moment (what a server sees: SIGKILL, OOM,
a crash); an operating-system crash or power cut may lose the last commits (never corrupts
the file). ``sync="full"`` (``synchronous=FULL``): every commit is fsync'ed first, which
survives power loss too, at the cost of an fsync per event.

Not stored (rebuilt after a restart): the request gate's state (a reloaded user's gate
starts afresh), the staleness counters, the cached user states and scores, a failed
request's note, in-flight requests, the harm guard's click evidence and an edit a guard
holds out (the base head the user was served is stored; a reloaded user's evidence starts
at zero and its next edit is judged on the clicks after the reload), and the learned
trigger's base ranks of the clicks (NaN after a reload).

Example::

    state = DeviceStateStore("device-state.sqlite")
    state.record_event("u1", 1, "i42", 1700000000)
    state.load_user("u1").events        # [(1, "i42", 1700000000)]
    state.close()
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recsys.errors import RecsysError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
SyncMode = Literal["normal", "full"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,       -- the user's position at the snapshot
    history TEXT NOT NULL,           -- JSON [[item_id, timestamp], ...], oldest first
    seen TEXT NOT NULL,              -- JSON [item_id, ...]
    edit_payload BLOB,               -- the active edit (NULL: base model)
    proto_payload BLOB,              -- its prototype's own edit (residual edits)
    edit_info TEXT,                  -- JSON: edit_id, prototype id/version, source, ...
    edit_source TEXT,
    edit_id INTEGER,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    user_id TEXT NOT NULL,
    position INTEGER NOT NULL,       -- 1-based position of the event in the user's history
    item_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (user_id, position)
) WITHOUT ROWID;
"""


class StateWriteError(RecsysError):
    """The device could not make an event or an edit durable; nothing was changed.

    Retryable (UNAVAILABLE at the edge): the disk may be full or the file locked.
    """

    retryable = True


@dataclass
class StoredUser:
    """A user as stored: the snapshot, the events after it, the active edit."""

    position: int
    history: list[tuple[str, int]]
    seen: list[str]
    events: list[tuple[int, str, int]] = field(default_factory=list)  # (position, item, time)
    edit_payload: bytes | None = None
    proto_payload: bytes | None = None
    edit_info: dict[str, Any] | None = None


class DeviceStateStore:
    """The device's durable state in one SQLite file (see the module docstring).

    Used from the server's event loop only (one connection).

    Args:
        path: the SQLite file (created with its folder).
        sync: "normal" or "full" (see the module docstring).
        busy_timeout_s: how long a write waits for another process's lock.
    """

    def __init__(
        self, path: str | Path, *, sync: SyncMode = "normal", busy_timeout_s: float = 0.25
    ) -> None:
        if sync not in ("normal", "full"):
            raise ValueError(f"sync must be 'normal' or 'full', got {sync!r}")
        self.path = Path(path)
        self.sync = sync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={sync.upper()}")
        self.db.executescript(_SCHEMA)
        found = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if found is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif found[0] != SCHEMA_VERSION:
            raise StateWriteError(
                f"{self.path} has device-state schema {found[0]}, this code {SCHEMA_VERSION}; "
                "move the file away (or run with --no-state)"
            )
        self.events_written = 0
        self.snapshots_written = 0
        self.edits_written = 0

    # ---- writes ------------------------------------------------------------------------------
    def _commit(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        """Run ``statements`` in one transaction (BEGIN IMMEDIATE ... COMMIT)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StateWriteError(f"the device state {self.path} refused a write: {exc}") from exc

    @staticmethod
    def _snapshot_sql(
        user_id: str, position: int, history: Sequence[tuple[str, int]], seen: Iterable[str]
    ) -> list[tuple[str, Sequence[Any]]]:
        """Upsert the user's snapshot (keeping its edit), drop the events it covers."""
        hist = json.dumps([[i, int(t)] for i, t in history], separators=(",", ":"))
        seen_json = json.dumps(sorted(seen), separators=(",", ":"))
        now = int(time.time() * 1000)
        return [
            (
                "INSERT INTO users (user_id, position, history, seen, updated_ms) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
                "position=excluded.position, history=excluded.history, seen=excluded.seen, "
                "updated_ms=excluded.updated_ms",
                (user_id, position, hist, seen_json, now),
            ),
            ("DELETE FROM events WHERE user_id=? AND position<=?", (user_id, position)),
        ]

    def record_event(
        self,
        user_id: str,
        position: int,
        item_id: str,
        timestamp: int,
        *,
        snapshot: tuple[int, Sequence[tuple[str, int]], Iterable[str]] | None = None,
    ) -> None:
        """Make one event durable (one transaction, committed on return). ``snapshot``:
        (position, history, seen) written in the same transaction, before the event
        (a user's first durable write, or a compaction)."""
        sql = [] if snapshot is None else self._snapshot_sql(user_id, *snapshot)
        sql.append(
            (
                "INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)",
                (user_id, int(position), item_id, int(timestamp)),
            )
        )
        self._commit(sql)
        self.events_written += 1
        if snapshot is not None:
            self.snapshots_written += 1

    def write_snapshot(
        self, user_id: str, position: int, history: Sequence[tuple[str, int]], seen: Iterable[str]
    ) -> None:
        """Make a user durable as it is now (its seeded history, before eviction)."""
        self._commit(self._snapshot_sql(user_id, position, history, seen))
        self.snapshots_written += 1

    def write_edit(
        self,
        user_id: str,
        payload: bytes | None,
        proto_payload: bytes | None,
        info: dict[str, Any] | None,
    ) -> None:
        """Store the user's active edit (None: reverted to the base model). The user must
        be durable already (:meth:`write_snapshot` or an event)."""
        self._commit(
            [
                (
                    "UPDATE users SET edit_payload=?, proto_payload=?, edit_info=?, "
                    "edit_source=?, edit_id=?, updated_ms=? WHERE user_id=?",
                    (
                        payload,
                        proto_payload,
                        None if info is None else json.dumps(info),
                        None if info is None else str(info.get("source", "")),
                        None if info is None else int(info.get("edit_id", 0)),
                        int(time.time() * 1000),
                        user_id,
                    ),
                )
            ]
        )
        self.edits_written += 1

    # ---- reads -------------------------------------------------------------------------------
    def load_user(self, user_id: str) -> StoredUser | None:
        """The stored user (None: never made durable)."""
        row = self.db.execute(
            "SELECT position, history, seen, edit_payload, proto_payload, edit_info "
            "FROM users WHERE user_id=?",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        events = self.db.execute(
            "SELECT position, item_id, timestamp FROM events WHERE user_id=? AND position>? "
            "ORDER BY position",
            (user_id, row[0]),
        ).fetchall()
        return StoredUser(
            position=int(row[0]),
            history=[(str(i), int(t)) for i, t in json.loads(row[1])],
            seen=[str(i) for i in json.loads(row[2])],
            events=[(int(p), str(i), int(t)) for p, i, t in events],
            edit_payload=row[3],
            proto_payload=row[4],
            edit_info=None if row[5] is None else json.loads(row[5]),
        )

    def user_ids(self) -> set[str]:
        """Every stored user."""
        return {r[0] for r in self.db.execute("SELECT user_id FROM users")}

    def num_users(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM users").fetchone()[0])

    def max_pushed_edit_id(self) -> int:
        """The largest id of a stored pushed edit (ApplyEdit's counter continues above)."""
        row = self.db.execute(
            "SELECT max(edit_id) FROM users WHERE edit_source IS NOT NULL "
            "AND edit_source != 'cloud'"
        ).fetchone()
        return int(row[0] or 0)

    def stats(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sync": self.sync,
            "events_written": self.events_written,
            "snapshots_written": self.snapshots_written,
            "edits_written": self.edits_written,
        }

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:  # pragma: no cover - closing twice / a broken file
            logger.exception("closing the device state %s", self.path)
