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
  edit is installed or reverted;
* **the harm guard's state** (issue 15; table ``guard``, schema 2): the user's evidence
  (the last ``window`` clicks' gain differences, a float64 blob, and the cumulative
  clicks, sum and sum of squares it reports to the cloud), written in the transaction of
  the event whose click it scored, and the **candidate** edit a guard holds out (its
  payloads and info like the active edit's, and who holds it: "device" or "fleet"), written
  with the active edit (the two never coexist: a held edit is served as the base head);
* **device-wide counters** (table ``counters``: a name and a non-negative integer; the
  harm guards' ``guard_accepted``, ``guard_rejected``, ``fleet_held``): a decision's
  increments are added in the transaction of the edit or candidate write it produced
  (:meth:`DeviceStateStore.write_edit` ``counts``), so the stored counts are exactly the
  decisions whose outcome is stored (a failed write adds nothing), and they are read back
  when the file is opened (:meth:`DeviceStateStore.counters`; a missing row is zero).

Item ids (not the ranker's indices) are stored, so a state file survives a catalogue
re-index; an edit stored for another ranker (model version) is dropped on load.

**Synchronous mode.** The file is in WAL mode. ``sync="normal"`` (the default,
``PRAGMA synchronous=NORMAL``): a commit is in the WAL when the call returns, so it
survives the *process* being killed at any moment (what a server sees: SIGKILL, OOM,
a crash); an operating-system crash or power cut may lose the last commits (never corrupts
the file). ``sync="full"`` (``synchronous=FULL``): every commit is fsync'ed first, which
survives power loss too, at the cost of an fsync per event.

**Versions.** The ``meta`` table holds the schema version. A schema-1 file (written
before the guard's state was stored) is upgraded in place when it is opened (the empty
``guard`` table is added: its users start with empty evidence and no candidate); a file
of another version is refused (StateWriteError). The ``counters`` table is created when
missing, in a schema-1 or schema-2 file alike (every table is ``CREATE ... IF NOT
EXISTS`` at open), without a new schema version: the table only adds rows nothing else
depends on, a file without it (or without a counter's row) reads as zero counts, and a
device running the previous code still opens a file that has it (it ignores the table:
the counts then miss the decisions that code made; a schema 3 would instead make that
device refuse the file, and with it every user's history and edit). Counter rows are
checked when the file is opened (an integer >= 0: a bad one is a DataFormatError naming
the file, the counter and the fix). Every guard row is validated when the
file is opened and again when its user is loaded (finite, the window no longer than the
clicks, consistent sums: :func:`device_ranker.guard.check_evidence`; a known holder,
a candidate exactly when held, never beside an active edit): a bad row stops the file
opening (the device does not start; nothing is loaded) with a
:class:`~recsys.errors.DataFormatError` naming the file, the user and the fix (restore a
backup, or delete that user's guard row: its history and edit are kept). At open the
rows are screened all at once (one SQL scan, numpy over the evidence blobs:
:mod:`device_ranker.service.state_screen`) and only the rows the screen flags get the
per-row Python check, which decides and words the error: the same rows are refused as
by checking each in Python (the screen flags every such row), at a fraction of the cost
(10^5 guarded users: 0.5 s instead of 1.9 s, 10^6: 5 s instead of 20 s; ``recsys
bench device-state --open-users``).

Not stored (rebuilt after a restart): the request gate's state (a reloaded user's gate
starts afresh), the staleness counters, the cached user states and scores, a failed
request's note, in-flight requests, the other device-wide counters (edit requests,
failures, applied edits, bytes, answers by mode, evictions: they restart at zero, as a
process's Prometheus counters do), and the learned trigger's base ranks of the clicks
(NaN after a reload).

Example::

    state = DeviceStateStore("device-state.sqlite")
    state.record_event("u1", 1, "i42", 1700000000)
    state.load_user("u1").events        # [(1, "i42", 1700000000)]
    state.counters()                    # {} until a write_edit(..., counts=...) adds some
    state.close()
"""

from __future__ import annotations

import json
import logging
import sqlite3
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from device_ranker.guard import check_evidence
from device_ranker.service.state_screen import suspect_guard_rows
from recsys.errors import DataFormatError, RecsysError, ValidationError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "2"  # 2: the guard table (1: no guard state; upgraded when opened)
HOLDERS = ("device", "fleet")
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
CREATE TABLE IF NOT EXISTS guard (
    user_id TEXT PRIMARY KEY,
    -- the evidence (all NULL: no click scored): the window m, its gain differences
    -- (float64 little-endian, oldest first), the cumulative clicks, sum, sum of squares
    window INTEGER,
    diffs BLOB,
    clicks INTEGER,
    gain_sum REAL,
    gain_squares REAL,
    held_by TEXT NOT NULL DEFAULT '', -- who holds the candidate: "device", "fleet", ""
    candidate_payload BLOB,          -- the held edit (NULL: none held)
    candidate_proto BLOB,            -- its prototype's own edit (residual edits)
    candidate_info TEXT,             -- JSON like users.edit_info
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,           -- e.g. guard_accepted, guard_rejected, fleet_held
    value INTEGER NOT NULL           -- device-wide, >= 0 (a missing row: 0)
);
"""


# the guard table's columns read back (after the user id)
_EVIDENCE_COLUMNS = "window, diffs, clicks, gain_sum, gain_squares"
_GUARD_COLUMNS = f"{_EVIDENCE_COLUMNS}, held_by, candidate_payload, candidate_proto, candidate_info"


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"malformed candidate info ({exc})") from exc
    if not isinstance(value, dict):
        raise ValidationError("the candidate info is not a JSON object")
    return value


class StateWriteError(RecsysError):
    """The device could not make an event or an edit durable; nothing was changed.

    Retryable (UNAVAILABLE at the edge): the disk may be full or the file locked.
    """

    retryable = True


@dataclass(frozen=True)
class StoredEvidence:
    """A user's harm-guard evidence as stored: the window's gain differences [<= m]
    (oldest first; a float64 little-endian blob in the file, exact) and the cumulative
    clicks, sum and sum of squares."""

    window: int
    diffs: tuple[float, ...]
    clicks: int
    total: float
    squares: float

    def to_row(self) -> tuple[int, bytes, int, float, float]:
        """(window, diffs blob, clicks, sum, squares): the guard table's columns."""
        blob = struct.pack(f"<{len(self.diffs)}d", *self.diffs)
        return self.window, blob, self.clicks, self.total, self.squares

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StoredEvidence | None:
        """Parsed and checked (None: no evidence stored; ValidationError: a missing or
        malformed value, NaN, wrong lengths, inconsistent sums)."""
        if all(v is None for v in row):
            return None
        window, blob, clicks, total, squares = row
        if any(v is None for v in row):  # SQLite stores a NaN REAL as NULL
            raise ValidationError(
                "a missing guard evidence value (window, diffs, clicks, sum and squares "
                "are stored together; a NaN sum is stored as NULL)"
            )
        if not isinstance(blob, bytes) or len(blob) % 8:
            size = len(blob) if isinstance(blob, bytes | str) else type(blob).__name__
            raise ValidationError(
                f"the gain differences ({size} bytes) are not a whole number of float64 values"
            )
        try:
            ev = cls(int(window), struct.unpack(f"<{len(blob) // 8}d", blob), int(clicks),
                     float(total), float(squares))  # fmt: skip
            exact_clicks = float(clicks)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValidationError(f"malformed guard evidence ({exc})") from exc
        check_evidence(ev.diffs, exact_clicks, ev.total, ev.squares, ev.window)
        return ev


@dataclass(frozen=True)
class StoredGuard:
    """A user's harm-guard state as stored: its evidence (None: no click scored yet) and
    the candidate edit a guard holds out (``held_by`` "" and no payload: none)."""

    evidence: StoredEvidence | None = None
    held_by: str = ""
    candidate_payload: bytes | None = None
    candidate_proto: bytes | None = None
    candidate_info: dict[str, Any] | None = None

    def check(self) -> None:
        """ValidationError unless the holder is known and a candidate is stored exactly
        when one is held (with its info)."""
        if self.held_by not in ("", *HOLDERS):
            raise ValidationError(f"unknown holder {self.held_by!r} (expected one of {HOLDERS})")
        has = bool(self.candidate_payload)
        if has != bool(self.held_by) or has != (self.candidate_info is not None):
            raise ValidationError(
                f"held_by {self.held_by!r} with {'a' if has else 'no'} candidate payload and "
                f"{'no' if self.candidate_info is None else 'its'} info"
            )


@dataclass
class StoredUser:
    """A user as stored: the snapshot, the events after it, the active edit, the guard."""

    position: int
    history: list[tuple[str, int]]
    seen: list[str]
    events: list[tuple[int, str, int]] = field(default_factory=list)  # (position, item, time)
    edit_payload: bytes | None = None
    proto_payload: bytes | None = None
    edit_info: dict[str, Any] | None = None
    guard: StoredGuard | None = None  # None: no guard state (a schema-1 file: none)


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
        found = None
        if self._has_meta():  # checked before anything is written to the file
            found = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if found is not None and found[0] not in ("1", SCHEMA_VERSION):
            self.db.close()
            raise StateWriteError(
                f"{self.path} has device-state schema {found[0]}, this code {SCHEMA_VERSION}; "
                "move the file away (or run with --no-state)"
            )
        self.db.executescript(_SCHEMA)
        if found is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif found[0] == "1":  # the guard table was just added: empty evidence for all
            self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (SCHEMA_VERSION,))
            logger.info("device state %s upgraded from schema 1 to %s (guard state)",
                        self.path, SCHEMA_VERSION)  # fmt: skip
        self.events_written = 0
        self.snapshots_written = 0
        self.edits_written = 0
        self.guards_written = 0
        try:
            self.check_guards()
            self.counters()
        except DataFormatError:
            self.db.close()
            raise

    def _has_meta(self) -> bool:
        row = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'")
        return row.fetchone() is not None

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
        evidence: StoredEvidence | None = None,
    ) -> None:
        """Make one event durable (one transaction, committed on return). ``snapshot``:
        (position, history, seen) written in the same transaction, before the event
        (a user's first durable write, or a compaction); ``evidence``: the user's guard
        evidence with this event's click scored (its candidate is left as stored)."""
        sql = [] if snapshot is None else self._snapshot_sql(user_id, *snapshot)
        sql.append(
            (
                "INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)",
                (user_id, int(position), item_id, int(timestamp)),
            )
        )
        if evidence is not None:
            sql.append(
                (
                    f"INSERT INTO guard (user_id, {_EVIDENCE_COLUMNS}, updated_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
                    "window=excluded.window, diffs=excluded.diffs, clicks=excluded.clicks, "
                    "gain_sum=excluded.gain_sum, gain_squares=excluded.gain_squares, "
                    "updated_ms=excluded.updated_ms",
                    (user_id, *evidence.to_row(), int(time.time() * 1000)),
                )
            )
        self._commit(sql)
        self.events_written += 1
        if snapshot is not None:
            self.snapshots_written += 1
        if evidence is not None:
            self.guards_written += 1

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
        guard: StoredGuard | None = None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        """Store the user's active edit (None: reverted to the base model) and, in the same
        transaction, its guard state (None: none; a held candidate, or no candidate any
        more, with the evidence) and ``counts``, increments added to the device-wide
        counters (the guard decision that produced this write: counted exactly when it is
        stored). The user must be durable already (:meth:`write_snapshot` or an event)."""
        increments = {str(k): int(v) for k, v in (counts or {}).items() if v}
        if any(v < 0 for v in increments.values()):
            raise ValueError(f"counter increments must be >= 0, got {increments}")
        now = int(time.time() * 1000)
        sql: list[tuple[str, Sequence[Any]]] = [
            (
                "UPDATE users SET edit_payload=?, proto_payload=?, edit_info=?, "
                "edit_source=?, edit_id=?, updated_ms=? WHERE user_id=?",
                (
                    payload,
                    proto_payload,
                    None if info is None else json.dumps(info),
                    None if info is None else str(info.get("source", "")),
                    None if info is None else int(info.get("edit_id", 0)),
                    now,
                    user_id,
                ),
            )
        ]
        if guard is None:
            sql.append(("DELETE FROM guard WHERE user_id=?", (user_id,)))
        else:
            if payload and guard.candidate_payload:
                raise ValueError("an active edit and a held candidate cannot be stored together")
            sql.append(
                (
                    f"INSERT OR REPLACE INTO guard (user_id, {_GUARD_COLUMNS}, updated_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        user_id,
                        *(guard.evidence.to_row() if guard.evidence else (None,) * 5),
                        guard.held_by,
                        guard.candidate_payload,
                        guard.candidate_proto,
                        None if guard.candidate_info is None else json.dumps(guard.candidate_info),
                        now,
                    ),
                )
            )
        sql.extend(
            (
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value=value+excluded.value",
                (name, n),
            )
            for name, n in sorted(increments.items())
        )
        self._commit(sql)
        self.edits_written += 1
        if guard is not None:
            self.guards_written += 1

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
        guard_row = self.db.execute(
            f"SELECT {_GUARD_COLUMNS} FROM guard WHERE user_id=?", (user_id,)
        ).fetchone()
        guard = None
        if guard_row is not None:
            guard = self._parse_guard(user_id, guard_row, has_edit=bool(row[3]))
        return StoredUser(
            position=int(row[0]),
            history=[(str(i), int(t)) for i, t in json.loads(row[1])],
            seen=[str(i) for i in json.loads(row[2])],
            events=[(int(p), str(i), int(t)) for p, i, t in events],
            edit_payload=row[3],
            proto_payload=row[4],
            edit_info=None if row[5] is None else json.loads(row[5]),
            guard=guard,
        )

    def _parse_guard(self, user_id: str, row: Sequence[Any], *, has_edit: bool) -> StoredGuard:
        """One guard row (:data:`_GUARD_COLUMNS` after the user id), checked; a bad one is
        a DataFormatError naming the file, the user and the fix."""
        *evidence, held_by, payload, proto, info = row
        try:
            guard = StoredGuard(
                evidence=StoredEvidence.from_row(evidence),
                held_by=str(held_by),
                candidate_payload=payload,
                candidate_proto=proto,
                candidate_info=None if info is None else _json_object(info),
            )
            guard.check()
            if has_edit and guard.candidate_payload:
                raise ValidationError("a held candidate beside an active edit")
        except ValidationError as exc:
            quoted = user_id.replace("'", "''")
            raise DataFormatError(
                self.path,
                None,
                f"user {user_id!r}: bad harm-guard state ({exc}); nothing was loaded. "
                "Restore the file from a backup, or drop that user's guard state only "
                "(its history and edit are kept; its evidence restarts at zero): sqlite3 "
                f"{self.path} \"DELETE FROM guard WHERE user_id='{quoted}'\"",
            ) from exc
        return guard

    def check_guards(self, *, screen: bool = True) -> int:
        """Check every stored guard row; returns how many there are. Run when the file is
        opened, so a bad file stops the device before it serves anyone (nothing loaded).

        ``screen`` (the default): one SQL scan and numpy over all rows
        (:func:`~device_ranker.service.state_screen.suspect_guard_rows`) pick the rows
        that may be bad, and only those get the exact per-row check
        (:meth:`_parse_guard`), which decides and words the error: the same rows are
        refused with the same message as by checking every row, at a fraction of the
        cost (``recsys bench device-state --open-users``). ``screen=False``: the exact
        check on every row (the reference the bench and the tests compare with)."""
        sql = (
            f"SELECT g.user_id, {_GUARD_COLUMNS}, u.edit_payload IS NOT NULL "
            "FROM guard g LEFT JOIN users u USING (user_id)"
        )
        if not screen:
            n = 0
            for user_id, *row, has_edit in self.db.execute(sql):
                self._parse_guard(user_id, row, has_edit=bool(has_edit))
                n += 1
            return n
        for rowid in suspect_guard_rows(self.db):
            user_id, *row, has_edit = self.db.execute(f"{sql} WHERE g.rowid=?", (rowid,)).fetchone()
            self._parse_guard(user_id, row, has_edit=bool(has_edit))
        return self.guard_users()

    def counters(self) -> dict[str, int]:
        """The stored device-wide counters (name -> count; a counter never written is
        absent: zero). Checked (read when the file is opened): a count that is not an
        integer >= 0 is a DataFormatError naming the file, the counter and the fix."""
        out = {}
        for name, value, kind in self.db.execute(
            "SELECT name, value, typeof(value) FROM counters ORDER BY name"
        ):
            if kind != "integer" or value < 0:
                quoted = str(name).replace("'", "''")
                raise DataFormatError(
                    self.path,
                    None,
                    f"counter {name!r} is {value!r} ({kind}), not a count >= 0; nothing was "
                    "loaded. Restore the file from a backup, or drop that counter only (it "
                    f'restarts at zero): sqlite3 {self.path} "DELETE FROM counters WHERE '
                    f"name='{quoted}'\"",
                )
            out[str(name)] = int(value)
        return out

    def guard_users(self) -> int:
        """Users with a stored guard state."""
        return int(self.db.execute("SELECT count(*) FROM guard").fetchone()[0])

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
            "guards_written": self.guards_written,
        }

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:  # pragma: no cover - closing twice / a broken file
            logger.exception("closing the device state %s", self.path)
