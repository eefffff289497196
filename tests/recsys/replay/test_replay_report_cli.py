"""``recsys replay`` end to end on the tiny world (table, results.json with every figure,
results.md, PNG plots), clean CLI errors, and the report's statistics and goal checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.cli import main
from recsys.replay.config import PolicySpec
from recsys.replay.records import EventRecords
from recsys.replay.report import goal_checks, over_time, user_bootstrap_ci


def test_cli_replay_writes_the_report(world, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    common = ["--dataset", str(world.root), "--cache-dir", str(world.cache), "--no-progress"]
    rc = main(
        ["replay", *common, "--out", str(out), "--budgets", "100,20", "--negatives", "10",
         "--finetune-every", "4", "--json", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("Quality", "Cost per policy", "system gate 20%", "system timer 20%",
                 "finetune every 4", "duet gate 100%", "Targets"):  # fmt: skip
        assert text in printed, text
    res = json.loads((out / "results.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["policies"] == res["policies"]
    meta = res["meta"]
    assert meta["dataset"]["fingerprint"] == world.ds.fingerprint() and meta["seed"] == 0
    assert {"torch", "numpy", "python"} <= set(meta["versions"])
    assert meta["config"]["negatives"] == 10 and meta["token_source"] == "recent"
    assert "/" not in meta["artifact"].removeprefix("CACHE/").split("artifacts")[0]
    labels = [p["label"] for p in meta["policies"]]
    assert set(res["policies"]) == set(labels) == set(res["order"])
    for label, p in res["policies"].items():
        for key in ("events", "hr@10", "ndcg@10", "mrr@10", "uauc", "request_rate", "requests",
                    "device_us_per_event", "device_flops_per_event", "uplink_bytes_total",
                    "downlink_bytes_total", "cloud_ms_per_request_mean", "ndcg@10_rel_to_static",
                    "ndcg@10_diff_ci95"):  # fmt: skip
            assert key in p, (label, key)
        assert f"{p['ndcg@10']:.4f}" in printed
    gate = res["policies"]["system gate 20%"]
    assert gate["gate_threshold"] > 0 and "gate_train_rate" in gate
    assert set(res["over_time"]["ndcg@10"]) == set(labels)
    assert "system_vs_static_rel" in res["goals"] and "system_vs_finetune" in res["goals"]
    md = (out / "results.md").read_text()
    assert "| policy |" in md and "![ndcg_vs_budget](ndcg_vs_budget.png)" in md
    for name in ("ndcg_over_time", "ndcg_vs_budget", "quality_vs_cost"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budgets", "150%"], "budget"),
        (["--policies", "static,magic"], "kind must be one of"),
        (["--policies", "static", "--budgets", "10"], "--policies already names"),
        (["--workers", "0"], "--workers"),
        (["--min-history", "0"], "min_history"),
        (["--until-quantile", "0.5"], "must be above quantile"),
        (["--quantile", "0.6", "--until-quantile", "0.8"], "trained on the time split at quantile"),
    ],
)
def test_cli_rejects_bad_options_cleanly(world, tmp_path: Path, capsys, extra, message) -> None:
    rc = main(["replay", "--dataset", str(world.root), "--cache-dir", str(world.cache),
               "--out", str(tmp_path / "o"), "--no-progress", *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_missing_artefacts_say_what_to_train(world, tmp_path: Path, capsys) -> None:
    rc = main(["replay", "--dataset", str(world.root), "--cache-dir", str(tmp_path / "empty"),
               "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "recsys train adaptor" in err and "recsys train codebook" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--live-experiment", "exp.toml"], "--live-experiment needs --event-log"),
        (["--out", "o", "--event-log", "log.jsonl"], "--event-log goes with"),
    ],
)
def test_cli_service_modes_check_their_options(world, capsys, extra, message) -> None:
    rc = main(["replay", "--dataset", str(world.root), "--cache-dir", str(world.cache),
               "--no-progress", *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_cli_modes_are_exclusive_and_one_is_required(world, capsys) -> None:
    base = ["replay", "--dataset", str(world.root)]
    for extra in ([], ["--out", "o", "--parity"]):
        with pytest.raises(SystemExit) as exc:
            main([*base, *extra])
        assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_user_bootstrap_ci_brackets_the_mean_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 5)
    diff = rng.normal(0.02, 0.05, size=len(users))
    lo, hi = user_bootstrap_ci(diff, users, seed=1)
    assert lo < diff.mean() < hi and hi - lo < 0.05
    assert user_bootstrap_ci(diff, users, seed=1) == [lo, hi]
    assert user_bootstrap_ci(np.zeros(10), np.arange(10), seed=1) == [0.0, 0.0]


def test_goal_checks_compute_the_three_targets() -> None:
    specs = [PolicySpec("static"), PolicySpec("finetune"), PolicySpec("system", "gate", 1.0),
             PolicySpec("system", "gate", 0.1)]  # fmt: skip
    pol = {
        "static": {"ndcg@10": 0.10, "ndcg@10_rel_to_static": 0.0},
        "finetune every 5": {"ndcg@10": 0.104, "device_us_per_event": 1000.0,
                             "device_flops_per_event": 1e7},
        "system gate 100%": {"ndcg@10": 0.106, "ndcg@10_rel_to_static": 0.06,
                             "device_us_per_event": 5.0, "device_flops_per_event": 1e4},
        "system gate 10%": {"ndcg@10": 0.1059, "ndcg@10_rel_to_static": 0.059,
                            "device_us_per_event": 0.5, "device_flops_per_event": 1e3},
    }  # fmt: skip
    g = goal_checks(pol, specs)
    assert g["system_vs_static_rel"]["met"]
    assert g["system_vs_finetune"]["met"] and g["system_vs_finetune"]["device_time_ratio"] == 0.005
    assert g["system_vs_finetune_by_policy"]["system gate 10%"]["device_time_ratio"] == 0.0005
    assert g["budget10_gain_kept"]["value"] == pytest.approx(0.0059 / 0.006)
    assert g["budget10_gain_kept"]["met"]  # 98.3 % of the gain kept
    pol["system gate 10%"]["ndcg@10"] = 0.1058  # 96.7 %
    assert not goal_checks(pol, specs)["budget10_gain_kept"]["met"]


def test_over_time_bins_cover_every_event() -> None:
    n = 400
    rec = EventRecords(np.arange(n) % 7, np.zeros(n), np.arange(n), 1 + np.arange(n) % 12,
                       np.full(n, 0.5), np.zeros(n, bool))  # fmt: skip
    ot = over_time({"a": rec}, bins=8)
    assert sum(ot["events"]) == n and len(ot["ndcg@10"]["a"]) == 8
    assert ot["t_start"][0] == 0 and ot["t_end"][-1] == n - 1
