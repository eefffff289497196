"""`recsys demo` on a small canonical dataset: every stage runs and the JSON has its figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.cli import main
from recsys.data.canonical import Dataset, write_dataset


@pytest.fixture
def tiny_dataset_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    items = pd.DataFrame(
        {"item_id": [str(i) for i in range(6)], "title": [f"Movie number {i}" for i in range(6)]}
    )
    n = 60
    inter = pd.DataFrame(
        {
            "user_id": [f"u{i % 4}" for i in range(n)],
            "item_id": [str(v) for v in rng.integers(0, 6, size=n)],
            "timestamp": np.arange(n) * 100,
        }
    )
    return write_dataset(Dataset("tiny", items, inter), tmp_path / "tiny")


def test_demo_runs_every_stage_and_writes_json(
    tiny_dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.json"
    code = main(
        [
            "demo",
            "--dataset",
            str(tiny_dataset_dir),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "dataset tiny" in printed
    assert "time split" in printed
    assert "fused item features [6, 384]" in printed
    assert "top-5 for user" in printed
    report = json.loads(out.read_text())
    ranker = report["models"]["ranker"]["test"]
    assert ranker["users"] == 4 and ranker["events"] > 0
    assert 0.0 <= ranker["device ranker"]["ndcg@10"] <= 1.0
    assert report["data"]["users"] == 4
    assert report["data"]["interactions"] == 60
    assert (
        report["split"]["train_events"]
        + report["split"]["replay_events"]
        + report["split"]["cold_replay_events"]
        == 60
    )
    assert report["versions"]["torch"].startswith("2.13.0")


def test_demo_on_missing_dataset_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--dataset", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err
