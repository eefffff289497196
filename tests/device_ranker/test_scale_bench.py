"""``recsys bench scale`` at tiny sizes: the JSON has every figure, the recall is sane,
the plot is written, extrapolated sizes are labelled (no timings asserted)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from device_ranker.config import AnnConfig
from device_ranker.scale_bench import ScaleConfig, popularity, run_scale_bench, synthetic_histories
from recsys.cli import main

CATALOGUE_FIELDS = {
    "items",
    "path",
    "recommend_p50_ms",
    "recommend_p99_ms",
    "recommend_cpu_p50_ms",
    "cpu_share",
    "batch_users_per_s",
    "recall_at_10",
    "model_bytes",
    "index_bytes",
    "bytes_per_item",
    "server_bytes_per_item",
    "index_build_s",
    "edit_apply_p50_us",
    "edit_apply_p99_us",
}


def test_cli_writes_every_figure_and_the_plot(tmp_path, capsys) -> None:
    out = tmp_path / "scale.json"
    argv = ["bench", "scale", "--sizes", "300,800", "--users", "50,120"]
    argv += ["--extrapolate-users", "1000", "--events", "200", "--loop-items", "300"]
    argv += ["--latency-users", "5", "--recall-users", "16", "--batch-size", "16"]
    argv += ["--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Catalogue size" in printed and "extrapolated" in printed
    data = json.loads(out.read_text())
    assert [r["items"] for r in data["catalogue"]] == [300, 800]
    for row in data["catalogue"]:
        assert set(row) >= CATALOGUE_FIELDS
        assert row["path"] == "exact" and row["recall_at_10"] == 1.0  # below min_items
        assert row["model_bytes"] > row["items"] * 64 * 4  # at least the item table
        assert row["server_bytes_per_item"] > row["bytes_per_item"]  # + the id maps
        assert row["recommend_p99_ms"] >= row["recommend_p50_ms"] > 0
    users = data["user_table"]
    assert [(r["users"], r["measured"]) for r in users] == [(50, True), (120, True), (1000, False)]
    assert all(r["bytes_per_user"] > 0 for r in users)
    assert "extrapolated" in users[-1]["note"]
    loop = data["event_loop"]
    assert loop["events"] == 200 and loop["events_per_s"] > 0
    assert data["seed"] == 0 and "versions" in data and data["config"]["sizes"] == [300, 800]
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_ann_recall_is_measured_against_exact_scoring() -> None:
    cfg = ScaleConfig(
        sizes=(3000,),
        users=(),
        events=0,
        latency_users=5,
        throughput_batches=1,
        batch=32,
        recall_users=64,
        edit_repeats=20,
        ann=AnnConfig(mode="on", nlist=16, nprobe=16),  # every list: exact up to ties
    )
    row = run_scale_bench(cfg)["catalogue"][0]
    assert row["path"] == "ann-ivf" and row["index_bytes"] > 0
    assert 0.95 <= row["recall_at_10"] <= 1.0


def test_synthetic_data_is_seeded_and_skewed() -> None:
    p = popularity(1000, 1.0, np.random.default_rng(0))
    assert math.isclose(p.sum(), 1.0) and p.max() / np.median(p) > 100  # a long tail
    cfg = ScaleConfig()
    a = synthetic_histories(50, p, cfg, np.random.default_rng(1))
    b = synthetic_histories(50, p, cfg, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(1 <= len(h) <= cfg.history_cap for h in a)


@pytest.mark.parametrize("bad", ["0,10", "ten"])
def test_bad_sizes_are_refused(bad: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "scale", "--sizes", bad])
    assert "argument --sizes" in capsys.readouterr().err
