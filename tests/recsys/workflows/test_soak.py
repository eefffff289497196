"""The soak (``recsys bench soak``): its pass/fail logic on injected errors and RSS
growth, and one short real run of the command (a tiny cloud and a device server as child
processes, mixed open-loop load, 0 errors, a row per interval, RSS sampled)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from adaptor_helpers import tiny_dataset, tiny_ranker_config

from recsys.cli import main
from recsys.errors import ValidationError
from recsys.workflows.soak import Bins, SoakConfig, judge, summarize


def _interval(t: float, device_mb: float, cloud_mb: float, **extra: Any) -> dict[str, Any]:
    ok = {"requests": 10, "errors": 0, "error_codes": {}, "p50_ms": 1.0, "p99_ms": 2.0}
    return {"t_s": t, "rpcs": {"Recommend": ok, "GetStatus": {**ok, "requests": 1}},
            "device_rss_mb": device_mb, "cloud_rss_mb": cloud_mb, "device_edit_requests": 2,
            "device_edit_failures": 0, **extra}  # fmt: skip


def _totals(errors: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    errors = errors or {}
    return {"Recommend": {"requests": 30, "errors": sum(errors.values()), "error_codes": errors,
                          "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0, "throughput_rps": 1.0}}  # fmt: skip


def _verdict(cfg: SoakConfig, intervals: list[dict[str, Any]], totals: Any) -> list[str]:
    summary = summarize(cfg, intervals, totals)
    summary["alive"] = {"device": True, "cloud": True}
    return judge(summary, cfg)


def test_config_ranges() -> None:
    with pytest.raises(ValidationError, match="minutes"):
        SoakConfig(checkpoint="r.pt", adaptor="a.pt", minutes=0)
    with pytest.raises(ValidationError, match="edit_via"):
        SoakConfig(checkpoint="r.pt", adaptor="a.pt", edit_via="phone")
    bench = SoakConfig(checkpoint="r.pt", adaptor="a.pt", cache_dir="/c", users=7).bench_config()
    assert bench.users == 7 and bench.location_args() == ["--cache-dir", "/c"]


def test_bins_take_an_interval_and_start_again() -> None:
    bins = Bins()
    for ms in range(1, 101):
        bins.add(float(ms), None)
    bins.add(None, "UNAVAILABLE")
    row = bins.take()
    assert row["requests"] == 100 and row["errors"] == 1
    assert row["error_codes"] == {"UNAVAILABLE": 1}
    assert row["p50_ms"] == pytest.approx(50.5) and row["p99_ms"] == pytest.approx(99.01)
    assert bins.take()["requests"] == 0


def test_a_clean_run_passes_and_growth_is_measured_from_the_baseline() -> None:
    cfg = SoakConfig(checkpoint="r", adaptor="a", rss_growth_mb=50, rss_baseline_s=60)
    # the first minute may grow (warm-up); from the 60 s sample on, +30 MB < 50 MB
    rows = [_interval(10, 300, 500), _interval(60, 400, 520), _interval(600, 430, 540)]
    summary = summarize(cfg, rows, _totals())
    assert summary["rss_growth_mb"] == {"device": 30, "cloud": 20}
    assert summary["rss"]["device"]["first_mb"] == 300
    assert summary["errors"] == 0 and summary["device_edit_requests"] == 6
    # a sample taken a little after its 60 s tick is still the baseline
    late = [_interval(10, 300, 500), _interval(60.02, 400, 520, tick_s=60.0),
            _interval(600, 430, 540)]  # fmt: skip
    assert summarize(cfg, late, _totals())["rss"]["device"]["baseline_mb"] == 400
    assert _verdict(cfg, rows, _totals()) == []


def test_injected_errors_fail_the_soak() -> None:
    cfg = SoakConfig(checkpoint="r", adaptor="a")
    rows = [_interval(10, 300, 500), _interval(20, 300, 500)]
    (why,) = _verdict(cfg, rows, _totals({"DEADLINE_EXCEEDED": 1}))
    assert "1 errors" in why and "Recommend:DEADLINE_EXCEEDED" in why
    # a failed GetStatus sample, or a device->cloud GenerateEdit that failed, is an error too
    bad_status = {"requests": 0, "errors": 1, "error_codes": {"UNAVAILABLE": 1}}
    rows[1]["rpcs"]["GetStatus"] = bad_status
    rows[0]["device_edit_failures"] = 2
    summary = summarize(cfg, rows, _totals())
    assert summary["errors"] == 3
    assert summary["error_codes"] == {"GetStatus:UNAVAILABLE": 1,
                                      "device->cloud GenerateEdit:FAILED": 2}  # fmt: skip
    summary["alive"] = {"device": True, "cloud": False}
    assert any("cloud server died" in w for w in judge(summary, cfg))


def test_rss_growth_past_the_bound_fails_the_soak() -> None:
    cfg = SoakConfig(checkpoint="r", adaptor="a", rss_growth_mb=50, rss_baseline_s=60)
    rows = [_interval(30, 300, 500), _interval(60, 300, 500), _interval(600, 300, 551)]
    (why,) = _verdict(cfg, rows, _totals())
    assert why.startswith("cloud RSS grew 51.0 MB") and "bound 50 MB" in why
    # no RSS sample at all (e.g. no /proc) fails rather than passing unmeasured
    nan = float("nan")
    assert any("no RSS sample" in w for w in _verdict(cfg, [_interval(10, nan, nan)], _totals()))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(canonical dataset dir, ranker checkpoint) of the tiny walk world."""
    from device_ranker.train import train
    from recsys.data import write_dataset

    root = tmp_path_factory.mktemp("soak")
    ds = tiny_dataset()
    ds_dir = Path(write_dataset(ds, root / "walk"))
    train(tiny_ranker_config(), ds, checkpoint_path=root / "ranker.pt", progress=False)
    return ds_dir, root / "ranker.pt"


@pytest.mark.slow
def test_a_short_soak_of_the_real_command(world, tmp_path: Path, capsys) -> None:
    """``recsys bench soak`` for 18 s against real server processes: exit 0, no error, a
    row per 3 s interval with every RPC and both servers' RSS, new users evicted past the
    device's bound, the JSON and the PNG written."""
    ds_dir, ckpt = world
    out_json, out_png = tmp_path / "soak.json", tmp_path / "soak.png"
    code = main(["bench", "soak", "--dataset", str(ds_dir), "--checkpoint", str(ckpt),
                 "--adaptor", str(tmp_path / "none.pt"), "--minutes", "0.3", "--interval", "3",
                 "--recommend-rate", "40", "--event-rate", "30", "--edit-rate", "2",
                 "--events-per-user", "3", "--users", "10", "--max-users", "40",
                 "--concurrency", "8", "--json", str(out_json), "--plot", str(out_png)])  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert code == 0, report["failures"]
    assert report["passed"] and report["summary"]["errors"] == 0
    assert report["engine"] == "tiny" and report["dataset"]["name"] == "tiny-walk"
    assert report["rpcs"] == ["Recommend", "RecordEvent", "RequestEdit"]
    rows = report["intervals"]
    assert len(rows) == 6  # 18 s / 3 s: five ticks, then the last interval after the run
    for row in rows:
        assert row["device_rss_mb"] > 10 and row["cloud_rss_mb"] > 10
        assert set(row["rpcs"]) == {"Recommend", "RecordEvent", "RequestEdit", "GetStatus"}
        assert row["users_in_memory"] <= 40
    counted = sum(r["rpcs"]["Recommend"]["requests"] for r in rows)
    assert counted == report["totals"]["Recommend"]["requests"] > 300  # ~40/s for 18 s
    assert report["summary"]["device_edit_requests"] > 0  # the device called the cloud
    assert sum(report["summary"]["edit_outcomes"].values()) > 0
    assert all(g is not None for g in report["summary"]["rss_growth_mb"].values())
    assert report["config"]["minutes"] == 0.3 and "versions" in report
    assert out_png.stat().st_size > 10_000
    assert "Per interval" in out and "soak: PASSED" in out
