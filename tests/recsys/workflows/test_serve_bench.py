"""The serve load benchmark: its config, its printed rows, and one short real run (a device
server and two tiny cloud servers as child processes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from adaptor_helpers import tiny_dataset, tiny_ranker_config

from recsys.errors import ValidationError
from recsys.workflows.serve_bench import (
    BenchData,
    ServeBenchConfig,
    edit_rows,
    recommend_rows,
    run_serve_bench,
)


def test_config_ranges_and_child_locations() -> None:
    with pytest.raises(ValidationError, match=r"ServeBenchConfig: concurrency: .*got 0"):
        ServeBenchConfig(checkpoint="r.pt", adaptor="a.pt", concurrency=0)
    with pytest.raises(ValidationError, match="duration"):
        ServeBenchConfig(checkpoint="r.pt", adaptor="a.pt", duration=0)
    with pytest.raises(ValidationError, match="edit_engine"):
        ServeBenchConfig(checkpoint="r.pt", adaptor="a.pt", edit_engine="vllm")
    cfg = ServeBenchConfig(checkpoint="r.pt", adaptor="a.pt", cache_dir="/c")
    assert cfg.location_args() == ["--cache-dir", "/c"]


def test_rows_keep_the_printed_columns() -> None:
    closed = {"mode": "closed", "concurrency": 4, "offered_rps": None, "requests": 10,
              "errors": 0, "throughput_rps": 5.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0,
              "client_cpu_ms_per_call": 0.5}  # fmt: skip
    row = recommend_rows([closed, {**closed, "offered_rps": 2000.0}])
    assert row[0]["offered_rps"] == "max" and row[1]["offered_rps"] == "2,000"
    assert math.isnan(row[0]["server_cpu_ms"])  # no /proc figure for the server
    edit = {**closed, "batching": "on", "max_batch": 32, "wait_ms": 5.0, "mean_batch": 3.5}
    assert list(edit_rows([edit])[0]) == [
        "batching", "max_batch", "wait_ms", "requests", "errors", "throughput_rps",
        "p50_ms", "p95_ms", "p99_ms", "mean_batch", "cloud_cpu_ms",
    ]  # fmt: skip
    assert math.isnan(edit_rows([edit])[0]["cloud_cpu_ms"])  # no /proc figure for the cloud


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(canonical dataset dir, ranker checkpoint) of the tiny walk world."""
    from device_ranker.train import train
    from recsys.data import write_dataset

    root = tmp_path_factory.mktemp("serve-bench")
    ds = tiny_dataset()
    ds_dir = Path(write_dataset(ds, root / "walk"))
    train(tiny_ranker_config(), ds, checkpoint_path=root / "ranker.pt", progress=False)
    return ds_dir, root / "ranker.pt"


def test_bench_data_follows_the_uplink_contract(world) -> None:
    ds_dir, ckpt = world
    cfg = ServeBenchConfig(checkpoint=str(ckpt), adaptor="none", dataset=str(ds_dir), users=3)
    work = BenchData.load(cfg)
    assert len(work.users) == len(work.recent) == len(work.summaries) == len(work.edits) == 3
    assert all(1 <= len(r) <= 50 for r in work.recent)
    assert {len(s) for s in work.summaries} == {16}  # 2 x D (D = 8)
    assert set(work.spec) == {"fc0", "fc1"}


@pytest.mark.slow
@pytest.mark.parametrize("auth", [False, True])
def test_a_short_run_measures_both_services(world, tmp_path: Path, capsys, auth) -> None:
    """With ``auth`` the servers check an operator token on every call: no call fails."""
    ds_dir, ckpt = world
    cfg = ServeBenchConfig(
        checkpoint=str(ckpt),
        adaptor=str(tmp_path / "no-adaptor.pt"),  # missing: the tiny cloud engine
        dataset=str(ds_dir),
        concurrency=2,
        duration=0.5,
        warmup=0.0,
        rate=50.0,
        users=5,
        edit_duration=0.5,
        auth=auth,
    )
    report = run_serve_bench(cfg)
    assert report["auth"] is auth
    closed, open_loop = report["recommend"]
    assert closed["requests"] > 0 and closed["errors"] == 0
    assert open_loop["offered_rps"] == 50.0 and open_loop["errors"] == 0
    assert report["goal_met"] is False  # 2 clients are below the 32 the goal needs
    on, off = report["generate_edit"]
    assert (on["batching"], off["batching"]) == ("on", "off")
    assert on["engine"] == "tiny" and on["requests"] > 0 and off["mean_batch"] == 1.0
    assert on["errors"] == off["errors"] == 0
    assert on["cloud_cpu_ms"] > 0 and off["cloud_cpu_ms"] > 0  # read from /proc
    out = capsys.readouterr().out
    assert "Recommend over loopback" in out and "GenerateEdit over loopback" in out


@pytest.mark.slow
def test_edits_only_with_a_named_adaptor_and_fewer_in_flight(world, tmp_path: Path) -> None:
    ds_dir, ckpt = world
    cfg = ServeBenchConfig(
        checkpoint=str(ckpt), adaptor=str(tmp_path / "other.pt"), dataset=str(ds_dir),
        concurrency=8, edit_concurrency=1, skip_recommend=True, warmup=0.0, users=3,
        edit_duration=0.5,
    )  # fmt: skip
    report = run_serve_bench(cfg)
    assert "recommend" not in report
    on, off = report["generate_edit"]
    assert on["concurrency"] == off["concurrency"] == 1
    assert on["mean_batch"] == 1.0  # one call in flight: every batch holds one request
