"""The open-time screen of the guard rows (device_ranker/service/state_screen.py) is
conservative: every row the exact per-row check refuses is flagged (evidence near every
boundary of the consistency test, by hypothesis; every holder / candidate / info / active
edit combination, exhaustively; rows across fetch chunks), and the rows a device writes
are not flagged at all (else the screen would save nothing)."""

from __future__ import annotations

import itertools
import math
import sqlite3
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_ranker.guard import GuardState
from device_ranker.service import state_screen
from device_ranker.service.state import DeviceStateStore
from device_ranker.service.state_screen import suspect_guard_rows
from recsys.errors import DataFormatError

COLUMNS = ("user_id", "window", "diffs", "clicks", "gain_sum", "gain_squares", "held_by",
           "candidate_payload", "candidate_info", "updated_ms")  # fmt: skip


def _db(rows: Sequence[dict[str, Any]], edited: Sequence[str] = ()) -> DeviceStateStore:
    """An in-memory state whose guard table holds ``rows`` (no check at open: empty)."""
    state = DeviceStateStore(":memory:")
    for n, row in enumerate(rows):
        user = row.get("user_id", f"u{n}")
        state.write_snapshot(user, 0, [], [])
        full = {"user_id": user, "held_by": "", "updated_ms": 0, **row}
        names = [c for c in COLUMNS if c in full]
        state.db.execute(f"INSERT INTO guard ({', '.join(names)}) VALUES "
                         f"({', '.join('?' for _ in names)})", [full[c] for c in names])  # fmt: skip
    for user in edited:
        state.db.execute("UPDATE users SET edit_payload=x'01' WHERE user_id=?", (user,))
    return state


def _refused(state: DeviceStateStore) -> set[int]:
    """The rowids the exact per-row check refuses."""
    out = set()
    rows = state.db.execute(
        "SELECT g.rowid, g.user_id, window, diffs, clicks, gain_sum, gain_squares, held_by, "
        "candidate_payload, candidate_proto, candidate_info, u.edit_payload IS NOT NULL "
        "FROM guard g LEFT JOIN users u USING (user_id)"
    ).fetchall()
    for rowid, user, *row, has_edit in rows:
        try:
            state._parse_guard(user, row, has_edit=bool(has_edit))
        except DataFormatError:
            out.add(rowid)
    return out


def _blob(values: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


EDGE = [-1.0, 1.0, 0.0, 0.5, -0.5, 1 / 3, -1 / 3, 0.1, math.nextafter(1.0, 2.0),
        math.nextafter(-1.0, -2.0), 2**-40]  # fmt: skip
SHIFT = [0.0, 0.5, 0.999, 1.0, 1.001, 2.0, 1e6]  # in units of the check's tolerance


@st.composite
def evidence(draw) -> dict[str, Any]:
    """A row near the boundaries: values at +-1, the older clicks extreme, the sums
    shifted by fractions and multiples of the check's tolerance, now and then NaN/inf."""
    value = st.one_of(st.sampled_from(EDGE), st.floats(-1.0, 1.0))
    window = draw(st.integers(1, 8))
    diffs = draw(st.lists(value, max_size=window))
    older = draw(st.lists(value, max_size=6))
    clicks = len(diffs) + len(older) - draw(st.sampled_from([0, 0, 0, 1]))
    every = older + diffs
    tol = 1e-9 * max(clicks, 1)
    total = math.fsum(every) + draw(st.sampled_from([-1, 1])) * draw(st.sampled_from(SHIFT)) * tol
    squares = math.fsum(v * v for v in every)
    squares += draw(st.sampled_from([-1, 1])) * draw(st.sampled_from(SHIFT)) * tol
    odd = draw(st.sampled_from([None, None, None, None, math.nan, math.inf]))
    if odd is not None and diffs:
        diffs[draw(st.integers(0, len(diffs) - 1))] = odd
    return {"window": window, "diffs": _blob(diffs), "clicks": max(clicks, 0),
            "gain_sum": total, "gain_squares": squares}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(evidence(), min_size=1, max_size=12))
def test_the_screen_flags_every_evidence_the_exact_check_refuses(rows) -> None:
    state = _db(rows)
    try:
        assert _refused(state) <= set(suspect_guard_rows(state.db))
    finally:
        state.close()


def test_the_screen_flags_every_bad_candidate_combination() -> None:
    holders = ["", "device", "fleet", "somebody", 5]
    payloads = [None, b"", b"RSE1", "text", 0]
    infos = [None, '{"edit_id": 1}', "[1, 2]", "{edit", '{"a": NaN}', b'{"a": 1}', 3]
    infos.append('{"edit_id": 1}\x00junk')  # SQLite's json_valid reads up to the NUL only
    rows, edited = [], []
    for n, (holder, payload, info, edit) in enumerate(
        itertools.product(holders, payloads, infos, [False, True])
    ):
        rows.append({"held_by": holder, "candidate_payload": payload, "candidate_info": info})
        if edit:
            edited.append(f"u{n}")
    state = _db(rows, edited)
    try:
        refused, flagged = _refused(state), set(suspect_guard_rows(state.db))
        assert refused <= flagged and len(refused) > 200  # most combinations are bad
        good = {"held_by": "device", "candidate_payload": b"RSE1", "candidate_info": "{}"}
        assert _db([good, {"held_by": ""}]).check_guards() == 2  # and those pass
    finally:
        state.close()


def test_the_rows_a_device_writes_are_not_flagged() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(300):
        window = int(rng.integers(1, 40))
        guard = GuardState.empty(window)
        every = []
        for _ in range(int(rng.integers(0, 120))):
            guard.record(int(rng.integers(1, 2000)), int(rng.integers(1, 2000)))
            every.append(guard.diffs[-1])
        if not every:
            rows.append({})
            continue
        rows.append({"window": window, "diffs": _blob(list(guard.diffs)), "clicks": len(every),
                     "gain_sum": math.fsum(every),
                     "gain_squares": math.fsum(d * d for d in every)})  # fmt: skip
    state = _db(rows)
    try:
        assert suspect_guard_rows(state.db) == [] and state.check_guards() == 300
    finally:
        state.close()


def test_bad_rows_in_any_fetch_chunk_stop_the_file_opening(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(state_screen, "_CHUNK", 7)
    good = {"window": 2, "diffs": _blob([0.5, -0.25]), "clicks": 3, "gain_sum": 0.5,
            "gain_squares": 0.3125}  # fmt: skip
    bad = {6: {"gain_sum": -3.5}, 7: {"diffs": _blob([0.5, math.nan])}, 39: {"clicks": 1}}
    path = tmp_path / "s.sqlite"
    state = DeviceStateStore(path)
    for n in range(40):
        row = {**good, **bad.get(n, {})}
        state.write_snapshot(f"u{n}", 0, [], [])
        state.db.execute(
            "INSERT INTO guard (user_id, window, diffs, clicks, gain_sum, gain_squares, "
            "updated_ms) VALUES (?, ?, ?, ?, ?, ?, 0)",
            (f"u{n}", *(row[c] for c in COLUMNS[1:6])),
        )
    assert suspect_guard_rows(state.db) == [7, 8, 40]  # rowids: the users u6, u7, u39
    state.close()
    with pytest.raises(DataFormatError, match="user 'u6'"):
        DeviceStateStore(path)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM guard WHERE user_id IN ('u6', 'u7')")
    with pytest.raises(DataFormatError, match=r"user 'u39'.*more than its 2 slots or the 1 cl"):
        DeviceStateStore(path)


@pytest.mark.parametrize("clicks", [10**6, 10**9])
def test_the_screen_holds_for_devices_with_very_many_clicks(clicks) -> None:
    """The check's tolerance grows with the clicks (1e-9 per click): rows of a long-lived
    device at and around every boundary are still flagged whenever the exact check refuses."""
    diffs = [1.0] * 20
    tol = 1e-9 * clicks
    rows = []
    for shift in (-2.0, -1.001, -1.0, -0.999, 0.0, 0.999, 1.0, 1.001, 2.0):
        for total, squares in [
            (clicks + shift * tol, float(clicks)),  # every click +1: |sum| <= clicks
            (float(clicks), clicks + shift * tol),  # sum of squares <= clicks
            (clicks / 2 + shift * tol, clicks / 4),  # sum^2 <= clicks * squares
            (20.0 - (clicks - 20) + shift * tol, float(clicks)),  # the older clicks' sum
        ]:
            rows.append({"window": 20, "diffs": _blob(diffs), "clicks": clicks,
                         "gain_sum": total, "gain_squares": squares})  # fmt: skip
    state = _db(rows)
    try:
        refused = _refused(state)
        assert refused and len(refused) < len(rows)  # both sides of the boundaries present
        assert refused <= set(suspect_guard_rows(state.db))
    finally:
        state.close()
