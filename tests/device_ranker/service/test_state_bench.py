"""``recsys bench device-state`` on the tiny ranker: every mode gives a row, the guard
rows write each user's evidence, and the state files are measured (no timing asserted)."""

from __future__ import annotations

from device_ranker.service.state_bench import MODES, StateBenchConfig, run_state_bench


def test_state_bench_rows_and_guard_rows(artifacts, tmp_path, capsys) -> None:
    out = run_state_bench(
        StateBenchConfig(checkpoint=str(artifacts[1]), events=10, users=3, tmp_dir=str(tmp_path))
    )
    rows = {r["mode"]: r for r in out["rows"]}
    assert list(rows) == [m.label for m in MODES]
    guarded = rows["state, sync=normal, edits, guard"]
    assert guarded["guard_rows"] == 3 and guarded["file_kb"] > 0
    assert rows["state, sync=normal, edits"]["guard_rows"] == 0
    assert all(r["p50_us"] > 0 for r in out["rows"])
    assert "| state, sync=normal, edits, guard |" in capsys.readouterr().out
