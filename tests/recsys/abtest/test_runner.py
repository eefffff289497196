"""``recsys abtest run``: pre-period split and per-arm records (unit), and the real replay
engine end to end on a tiny world (ranker + codebook + adaptor trained here in seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_world import train_tiny_world

from codebook.prototypes import PrototypeConfig
from codebook.store import PrototypeStore
from recsys.abtest.runner import build_tables, event_numbers
from recsys.cli import main
from recsys.data import Dataset, write_dataset
from recsys.data.registry import load_dataset
from recsys.replay.records import EventRecords

NUM_ITEMS = 30


def records(users, ts, ranks, requested=None) -> EventRecords:
    n = len(users)
    req = np.zeros(n, bool) if requested is None else np.asarray(requested, bool)
    return EventRecords(
        np.asarray(users), np.zeros(n), np.asarray(ts), np.asarray(ranks), np.full(n, 0.5), req
    )


def test_event_numbers_count_within_each_user_in_time_order() -> None:
    rec = records([5, 3, 5, 3, 5], [10, 11, 12, 13, 9], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(event_numbers(rec), [1, 0, 2, 1, 0])


def test_each_user_keeps_their_own_arms_records_after_the_pre_period() -> None:
    # users 0 and 1, 3 events each; static ranks 1 everywhere, "sys" ranks 2 everywhere
    users, ts = [0, 0, 0, 1, 1, 1], [100, 90_000, 200_000, 150, 100_000, 300_000]
    recs = {"static": records(users, ts, [1] * 6), "sys": records(users, ts, [2] * 6, [1] * 6)}
    table, daily, info = build_tables(
        recs,
        {"a": "static", "b": "sys"},
        np.array([0, 1]),
        np.array(["u0", "u1"]),
        np.array(["a", "b"]),
        metrics=["mrr@10", "request_rate"],
        pre_events=1,
    )
    np.testing.assert_array_equal(table.user_id, ["u0", "u1"])
    np.testing.assert_array_equal(table.n_events, [2, 2])  # first event is the pre-period
    np.testing.assert_allclose(table.values["mrr@10"], [1.0, 0.5])  # own arm's ranks
    np.testing.assert_allclose(table.values["request_rate"], [0.0, 1.0])
    np.testing.assert_allclose(table.pre["mrr@10"], [1.0, 1.0])  # static for everybody
    assert info["start"] == 90_000 and info["users_with_covariate"] == 2
    np.testing.assert_array_equal(daily.days, [0, 1, 2])
    np.testing.assert_allclose(daily.counts[:, 1], [1, 1, 2])  # u1: 100000 (day 0), 300000 (day 2)


def walk_dataset(num_users: int = 40, late_users: int = 12, length: int = 18) -> Dataset:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(num_users):
        step = 1 + u % 3
        start = int(rng.integers(NUM_ITEMS))
        # late users arrive after the cut, one every 6 hours: the replay spans days
        t0 = 10_000 + u if u < num_users - late_users else 1_000_000 + 21_600 * u
        seq = list(dict.fromkeys((start + step * i) % NUM_ITEMS for i in range(length)))
        rows += [(f"u{u}", f"i{item}", t0 + 3_600 * i) for i, item in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(NUM_ITEMS)]})
    return Dataset("walk", items, inter)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset directory, cache dir with the time-split ranker, codebook and adaptor)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("abtest-world")
    path = write_dataset(walk_dataset(), root / "walk")
    ds = load_dataset(path)
    cache = root / "cache"
    prototypes = PrototypeConfig(num_prototypes=3, residual_rank=2, refine_every=2)
    train_tiny_world(ds, cache, prototypes=prototypes)
    return path, cache


EXPERIMENT = """
name = "tiny"
salt = "tiny-salt"
primary_metric = "ndcg@10"
guardrail_metrics = ["auc"]
secondary_metrics = ["request_rate"]

[[arms]]
name = "static"
weight = 0.5
policy = { kind = "static" }

[[arms]]
name = "system"
weight = 0.5
policy = { kind = "system", trigger = "timer", budget = 0.5 }

[analysis]
bootstrap = 200
sequential_min_users = 2

[replay]
pre_period_events = 2
"""


def test_run_and_analyze_on_the_replay(world, tmp_path: Path, capsys) -> None:
    data, cache = world
    exp_file = tmp_path / "tiny.toml"
    exp_file.write_text(EXPERIMENT)
    out = tmp_path / "run"
    argv = [
        "abtest",
        "run",
        str(exp_file),
        "--out",
        str(out),
        "--dataset",
        str(data),
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--json",
        str(tmp_path / "run.json"),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Arms (per-user means" in printed
    info = json.loads((out / "run.json").read_text())
    assert info["exposed_users"] >= 6 and info["users_with_covariate"] == info["exposed_users"]
    assert "/tmp" not in json.dumps(info) and str(tmp_path) not in json.dumps(info)
    # assignments persisted, and equal to the hash
    with PrototypeStore.open(f"sqlite:///{out / 'assignments.sqlite'}") as store:
        counts = store.arm_counts(store.get_experiment("tiny").id)
    assert sum(counts.values()) == info["assigned_users"]
    users = (out / "users.csv").read_text().splitlines()
    from recsys.abtest.experiment import load_experiment

    exp = load_experiment(exp_file)
    for line in users[1:]:
        uid, arm = line.split(",")[:2]
        assert exp.assign(uid).name == arm
    # static users have no requests, system users (timer every 2 events) have some
    report_dir = tmp_path / "report"
    assert main(["abtest", "analyze", str(out), "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    arms = report["arms"]
    assert arms["static"]["means"]["request_rate"] == 0.0
    assert arms["system"]["means"]["request_rate"] > 0.2
    assert report["run"]["arm_policies"] == {"static": "static", "system": "system timer 50%"}
    # a second run re-uses the stored assignments (idempotent)
    assert main(argv) == 0
    capsys.readouterr()
    assert json.loads((out / "run.json").read_text())["stored_arm_counts"] == counts


def test_a_guarded_arm_with_an_explicit_artifact(world, tmp_path: Path, capsys) -> None:
    """An arm with the fleet guard (offline only) next to its unguarded twin, the adaptor
    artefact named on the command line; a missing artefact is a clear error."""
    data, cache = world
    guarded = 'policy = { kind = "system", trigger = "timer", budget = 0.5, guard = true, fleet_guard = true, guard_z = 0.0 }'
    text = EXPERIMENT.replace("weight = 0.5", "weight = 0.25").replace(
        "[analysis]", f'[[arms]]\nname = "guarded"\nweight = 0.5\n{guarded}\n\n[analysis]'
    )
    exp_file = tmp_path / "guard.toml"
    exp_file.write_text(text)
    (artifact,) = (cache / "artifacts").glob("*/adaptor/adaptor.pt")
    base = [
        "abtest",
        "run",
        str(exp_file),
        "--dataset",
        str(data),
        "--cache-dir",
        str(cache),
        "--no-progress",
    ]
    out = tmp_path / "run"
    assert main([*base, "--out", str(out), "--artifact", str(artifact)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["arm_policies"]["guarded"] == "system timer 50% fleet-guard z=0"
    users = (out / "users.csv").read_text().splitlines()
    assert any(line.split(",")[1] == "guarded" for line in users[1:])
    capsys.readouterr()
    assert (
        main([*base, "--out", str(tmp_path / "bad"), "--artifact", str(tmp_path / "none.pt")]) == 2
    )
    assert "none.pt" in capsys.readouterr().err
