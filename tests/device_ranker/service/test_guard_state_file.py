"""The harm guard's rows in the durable device state file (schema 2), without a server:
round trips (evidence with an event, the candidate with the edit, across a reopen), the
schema-1 upgrade, a newer schema refused untouched, and corrupted guard rows refused
when the file is opened (a DataFormatError naming the file, the user and the fix, which
works: after it the file opens with the user's history and edit intact); the device-wide
counters: added in the edit write's transaction (a failed write adds nothing), read back
after a reopen, zero in a file written before them (schema 1, or schema 2 without the
table), a bad counter row refused when the file is opened."""

from __future__ import annotations

import math
import sqlite3
import struct
from pathlib import Path

import pytest

from device_ranker.service.state import (
    DeviceStateStore,
    StateWriteError,
    StoredEvidence,
    StoredGuard,
)
from recsys.errors import DataFormatError

EVIDENCE = StoredEvidence(window=3, diffs=(-0.25, 0.125, -0.5), clicks=5, total=-0.5,
                          squares=0.4)  # fmt: skip
INFO = {"edit_id": 7, "prototype_id": 2, "prototype_version": 1, "source": "cloud",
        "payload_bytes": 4, "applied_at_ms": 1, "model_version": "m1"}  # fmt: skip
HELD = StoredGuard(EVIDENCE, "device", b"RSE1", b"PROT", INFO)


def _store(path: Path) -> DeviceStateStore:
    state = DeviceStateStore(path)
    state.write_snapshot("u", 2, [("i1", 1), ("i2", 2)], ["i1", "i2"])
    return state


def test_guard_state_round_trips_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    state = _store(path)
    state.write_edit("u", None, None, None, HELD)  # held: the base head, the candidate
    more = StoredEvidence(3, (0.125, -0.5, 0.0625), 6, -0.4375, 0.40390625)
    state.record_event("u", 3, "i3", 3, evidence=more)  # a click scored: evidence only
    assert state.stats()["guards_written"] == 2
    state.close()
    state = DeviceStateStore(path)
    stored = state.load_user("u")
    assert stored is not None and stored.edit_payload is None
    assert stored.guard == StoredGuard(more, "device", b"RSE1", b"PROT", INFO)
    assert [e[1] for e in stored.events] == ["i3"]
    state.write_edit("u", b"EDIT", None, {**INFO, "edit_id": 8}, StoredGuard(more))  # applied
    assert state.load_user("u").guard == StoredGuard(more)  # candidate gone, evidence kept
    state.write_edit("u", None, None, None, None)  # no guard state at all
    assert state.load_user("u").guard is None and state.guard_users() == 0
    with pytest.raises(ValueError, match="together"):
        state.write_edit("u", b"EDIT", None, INFO, HELD)
    state.close()


def test_float_evidence_is_stored_to_the_bit(tmp_path: Path) -> None:
    diffs = (0.1, -1 / 3, 2**-40)
    ev = StoredEvidence(5, diffs, 3, math.fsum(diffs), math.fsum(d * d for d in diffs))
    state = _store(tmp_path / "s.sqlite")
    state.record_event("u", 3, "i3", 3, evidence=ev)
    assert state.load_user("u").guard.evidence == ev
    state.close()


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE users (user_id TEXT PRIMARY KEY, position INTEGER NOT NULL, history TEXT NOT NULL,
    seen TEXT NOT NULL, edit_payload BLOB, proto_payload BLOB, edit_info TEXT,
    edit_source TEXT, edit_id INTEGER, updated_ms INTEGER NOT NULL);
CREATE TABLE events (user_id TEXT NOT NULL, position INTEGER NOT NULL, item_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL, PRIMARY KEY (user_id, position)) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema', '1');
INSERT INTO users (user_id, position, history, seen, updated_ms)
    VALUES ('old', 1, '[["i4",9]]', '["i4"]', 0);
"""


def test_a_schema_1_file_is_upgraded_with_empty_guard_state(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
    state = DeviceStateStore(path)
    stored = state.load_user("old")
    assert stored is not None and stored.history == [("i4", 9)] and stored.guard is None
    state.record_event("old", 2, "i5", 10, evidence=StoredEvidence(20, (0.5,), 1, 0.5, 0.25))
    assert state.counters() == {}  # a schema-1 file held no counters: all zero
    state.write_edit("old", None, None, None, None, {"guard_accepted": 1})
    state.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
    reopened = DeviceStateStore(path)
    assert reopened.load_user("old").guard is None  # the write dropped the evidence row
    assert reopened.counters() == {"guard_accepted": 1}
    reopened.close()


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "v9.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA.replace("'schema', '1'", "'schema', '9'"))
    with pytest.raises(StateWriteError, match="schema 9"):
        DeviceStateStore(path)
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "guard" not in tables


def _diffs(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


CORRUPT = {  # EVIDENCE is window 3, diffs (-0.25, 0.125, -0.5), clicks 5, sum -0.5, sq 0.4
    "nan diff": ({"diffs": _diffs(-0.25, math.nan, -0.5)}),
    "nan sum (stored as NULL)": ({"gain_sum": math.nan}),
    "a missing clicks count": ({"clicks": None}),
    "infinite squares": ({"gain_squares": math.inf}),
    "diffs not whole float64s": ({"diffs": b"\x00" * 20}),
    "diffs not a blob": ({"diffs": "abc"}),
    "window longer than its slots": ({"window": 2}),
    "window longer than the clicks": ({"clicks": 2, "gain_sum": -0.625}),
    "fractional clicks": ({"clicks": 5.5}),
    "clicks not a number": ({"clicks": "five"}),
    "a diff outside [-1, 1]": ({"diffs": _diffs(-0.25, 1.5, -0.5)}),
    "sum beyond the clicks": ({"gain_sum": -6.0}),
    "squares below the window's": ({"gain_squares": 0.1}),
    "sum^2 above clicks * squares": ({"gain_sum": -1.6, "gain_squares": 0.5}),
    "older clicks' sum impossible": ({"gain_sum": 2.5}),
    "unknown holder": ({"held_by": "somebody"}),
    "held without a candidate": ({"candidate_payload": None}),
    "candidate info not an object": ({"candidate_info": "[1, 2]"}),
    "candidate info not JSON": ({"candidate_info": "{edit"}),
}


@pytest.mark.parametrize("change", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupted_guard_row_stops_the_file_opening(tmp_path: Path, change) -> None:
    path = tmp_path / "s.sqlite"
    state = _store(path)
    state.write_edit("u", None, None, None, HELD)
    state.close()
    with sqlite3.connect(path) as db:
        sets = ", ".join(f"{column}=?" for column in change)
        db.execute(f"UPDATE guard SET {sets} WHERE user_id='u'", tuple(change.values()))
    with pytest.raises(DataFormatError) as err:
        DeviceStateStore(path)
    message = str(err.value)
    assert str(path) in message and "user 'u'" in message and "DELETE FROM guard" in message
    # the fix the message gives: drop the user's guard state only
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM guard WHERE user_id='u'")
    fixed = DeviceStateStore(path).load_user("u")
    assert fixed is not None and fixed.history == [("i1", 1), ("i2", 2)] and fixed.guard is None


def test_a_candidate_beside_an_active_edit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    state = _store(path)
    state.write_edit("u", None, None, None, HELD)
    state.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE users SET edit_payload=x'00' WHERE user_id='u'")
    with pytest.raises(DataFormatError, match="beside an active edit"):
        DeviceStateStore(path)


def test_counters_are_added_with_the_edit_write_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    state = _store(path)
    assert state.counters() == {}
    state.write_edit("u", None, None, None, HELD, {"guard_accepted": 1, "fleet_held": 1})
    state.write_edit("u", b"EDIT", None, INFO, StoredGuard(EVIDENCE),
                     {"guard_accepted": 1, "guard_rejected": 0})  # fmt: skip
    assert state.counters() == {"guard_accepted": 2, "fleet_held": 1}  # a 0 adds no row
    with pytest.raises(ValueError, match=">= 0"):
        state.write_edit("u", None, None, None, None, {"guard_rejected": -1})
    assert state.load_user("u").edit_payload == b"EDIT"  # the refused write wrote nothing
    state.close()
    state = DeviceStateStore(path)
    assert state.counters() == {"guard_accepted": 2, "fleet_held": 1}
    state.write_edit("u", None, None, None, None, {"guard_rejected": 3})
    assert state.counters() == {"guard_accepted": 2, "guard_rejected": 3, "fleet_held": 1}
    state.close()


def test_a_failed_edit_write_adds_no_counts(tmp_path: Path) -> None:
    """A real SQLite error at the counters (the last statements of the transaction):
    the edit and guard rows written before them in it are rolled back too."""
    path = tmp_path / "s.sqlite"
    state = _store(path)
    state.write_edit("u", None, None, None, HELD, {"guard_rejected": 1})
    state.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON counters "
                     "BEGIN SELECT RAISE(ABORT, 'disk full'); END")  # fmt: skip
    with pytest.raises(StateWriteError, match="disk full"):
        state.write_edit("u", b"EDIT", None, INFO, StoredGuard(EVIDENCE), {"guard_accepted": 1})
    stored = state.load_user("u")
    assert stored.edit_payload is None and stored.guard == HELD  # still held, no edit
    assert state.counters() == {"guard_rejected": 1} and state.stats()["edits_written"] == 1
    state.write_edit("u", b"EDIT", None, INFO, StoredGuard(EVIDENCE))  # no counts: no trigger
    assert state.load_user("u").edit_payload == b"EDIT"
    state.close()


def test_a_schema_2_file_without_counters_opens_with_zero_counts(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    state = _store(path)
    state.write_edit("u", None, None, None, HELD)
    state.close()
    with sqlite3.connect(path) as db:  # what a device wrote before the counters were stored
        db.execute("DROP TABLE counters")
    state = DeviceStateStore(path)
    assert state.counters() == {} and state.load_user("u").guard == HELD
    state.write_edit("u", None, None, None, HELD, {"fleet_held": 1})
    state.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
        assert db.execute("SELECT name, value FROM counters").fetchall() == [("fleet_held", 1)]


@pytest.mark.parametrize("value", [-1, 1.5, "many", None, b"\x01"])
def test_a_bad_counter_row_stops_the_file_opening(tmp_path: Path, value) -> None:
    path = tmp_path / "s.sqlite"
    state = _store(path)
    state.write_edit("u", b"EDIT", None, INFO, None, {"guard_accepted": 4, "fleet_held": 2})
    state.close()
    with sqlite3.connect(path) as db:
        if value is None:  # NOT NULL: a table rebuilt without it, as a hand edit might
            db.executescript("DROP TABLE counters; CREATE TABLE counters (name TEXT "
                             "PRIMARY KEY, value INTEGER); INSERT INTO counters VALUES "
                             "('guard_accepted', 4), ('fleet_held', NULL);")  # fmt: skip
        else:
            db.execute("UPDATE counters SET value=? WHERE name='fleet_held'", (value,))
    with pytest.raises(DataFormatError) as err:
        DeviceStateStore(path)
    message = str(err.value)
    assert str(path) in message and "counter 'fleet_held'" in message
    assert "DELETE FROM counters WHERE name='fleet_held'" in message
    with sqlite3.connect(path) as db:  # the fix the message gives: that counter restarts
        db.execute("DELETE FROM counters WHERE name='fleet_held'")
    fixed = DeviceStateStore(path)
    assert fixed.counters() == {"guard_accepted": 4}
    assert fixed.load_user("u").edit_payload == b"EDIT"
    fixed.close()
