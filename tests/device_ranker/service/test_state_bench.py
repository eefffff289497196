"""``recsys bench device-state`` on the tiny ranker: every mode gives a row, the guard
rows write each user's evidence, the state files are measured, and the open-time rows
build and open a file of guarded users (no timing asserted)."""

from __future__ import annotations

import sqlite3

from device_ranker.service.state import DeviceStateStore
from device_ranker.service.state_bench import MODES, StateBenchConfig, run_state_bench
from device_ranker.service.state_open_bench import HELD_EVERY, build_state_file


def test_state_bench_rows_and_guard_rows(artifacts, tmp_path, capsys) -> None:
    cfg = StateBenchConfig(checkpoint=str(artifacts[1]), events=10, users=3,
                           tmp_dir=str(tmp_path), open_users=(30,), open_repeats=1)  # fmt: skip
    out = run_state_bench(cfg)
    rows = {r["mode"]: r for r in out["rows"]}
    assert list(rows) == [m.label for m in MODES]
    guarded = rows["state, sync=normal, edits, guard"]
    assert guarded["guard_rows"] == 3 and guarded["file_kb"] > 0
    assert rows["state, sync=normal, edits"]["guard_rows"] == 0
    assert all(r["p50_us"] > 0 for r in out["rows"])
    (opened,) = out["open_rows"]
    assert opened["users"] == opened["guard_rows"] == 30 and opened["held"] == 3
    assert opened["open_s"] > 0 and opened["exact_s"] > 0 and opened["file_mb"] > 0
    assert out["config"]["open_users"] == [30]
    printed = capsys.readouterr().out
    assert "| state, sync=normal, edits, guard |" in printed and "| 30 | 30 | 3 |" in printed


def test_the_built_state_file_is_what_a_device_stores(tmp_path) -> None:
    """Every built guard row passes the exact per-row check, and the users load."""
    path = tmp_path / "s.sqlite"
    build_state_file(path, 25, window=20, history=4, payload=b"RSE1" + bytes(60))
    state = DeviceStateStore(path)
    try:
        assert state.check_guards(screen=False) == 25 == state.num_users()
        held = state.load_user("u0")
        assert held.guard.held_by == "device" and held.edit_payload is None
        assert held.guard.evidence.window == 20 and len(held.guard.evidence.diffs) == 20
        assert state.load_user("u1").edit_payload and state.load_user("u9").edit_payload is None
        assert len(state.load_user("u3").history) == 4
    finally:
        state.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT count(*) FROM guard WHERE held_by != ''").fetchone() == (
            25 // HELD_EVERY + 1,
        )


def test_the_open_users_flag() -> None:
    from recsys.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["bench", "device-state"]).open_users == [10_000, 100_000]
    assert parse(["bench", "device-state", "--open-users", "7", "70"]).open_users == [7, 70]
    assert parse(["bench", "device-state", "--open-users"]).open_users == []  # skipped
