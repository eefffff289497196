"""``recsys abtest analyze`` on a live event log and on a run directory; clean CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from abtest_synthetic import T0, events, experiment

from recsys.abtest.eventlog import read_event_log
from recsys.abtest.usertable import summarise, write_tables
from recsys.cli import main

TOML = """
name = "synthetic"
salt = "syn-1"
primary_metric = "ndcg@10"
guardrail_metrics = ["hr@10"]
secondary_metrics = ["request_rate", "bytes_per_event"]

[[arms]]
name = "control"
weight = 0.5
policy = {{ kind = "static" }}

[[arms]]
name = "good"
weight = 0.5
policy = {{ kind = "system", budget = 0.2 }}

[analysis]
bootstrap = 200
{extra}
"""


def write_log(path: Path, exp, *, users: int = 300, other_lines: int = 5) -> None:
    ids, arms, ev, _ = events(exp, users=users, per_user=6, days=5)
    order = np.argsort(ev.timestamp, kind="stable")
    with open(path, "w") as f:
        for i in order:
            u = int(ev.user[i])
            req = bool(ev.requested[i])
            f.write(
                json.dumps(
                    {
                        "user_id": ids[u],
                        "arm": arms[u],
                        "experiment": exp.name,
                        "timestamp": int(ev.timestamp[i]),
                        "item_id": "i1",
                        "rank": int(ev.rank[i]),
                        "num_items": 1000,
                        "requested": req,
                        "outcome": "applied" if req else "not_requested",
                        "bytes_up": 600 if req else 0,
                        "bytes_down": 6000 if req else 0,
                        "cloud_ms": 1.0,
                        "mode": "edited",
                        "logged_at_ms": 0,
                    }
                )
                + "\n"
            )
        for _ in range(other_lines):  # traffic of another experiment is skipped
            f.write(
                json.dumps(
                    {
                        "user_id": "x",
                        "arm": "zz",
                        "experiment": "other",
                        "timestamp": T0,
                        "rank": 1,
                        "requested": False,
                        "bytes_up": 0,
                        "bytes_down": 0,
                    }
                )
                + "\n"
            )


def test_analyze_an_event_log(tmp_path: Path, capsys) -> None:
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(TOML.format(extra=""))
    from recsys.abtest.experiment import load_experiment

    exp = load_experiment(exp_file)
    log = tmp_path / "events.jsonl"
    write_log(log, exp)
    users, _, info = read_event_log(log, exp)
    assert info["other_experiment_lines"] == 5 and info["assignment_mismatches"] == 0
    assert info["short_history_lines"] == 0
    assert info["users_with_covariate"] == 0 and len(users) == info["users"]
    out = tmp_path / "report"
    code = main(
        [
            "abtest",
            "analyze",
            "--events",
            str(log),
            "--experiment",
            str(exp_file),
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Differences vs control" in printed and "sample-ratio check" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["source"] == "event log"
    assert report["comparisons"]["ndcg@10"]["good"]["verdict"] == "ship"
    assert report["comparisons"]["ndcg@10"]["good"]["decision_test"] == "welch"  # no covariate
    bytes_row = report["comparisons"]["bytes_per_event"]["good"]
    assert bytes_row["welch"]["diff"] > 0
    full = json.loads((tmp_path / "r.json").read_text())
    assert "versions" in full and full["verdicts"] == report["verdicts"]
    for name in (
        "report.md",
        "effects.png",
        "sequential.png",
        "users.csv",
        "daily.csv",
        "experiment.json",
        "run.json",
    ):
        assert (out / name).is_file(), name
    # the converted directory can be analysed again on its own
    assert main(["abtest", "analyze", str(out)]) == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 1: invalid JSON"),
        ('{"user_id": "u"}', "line 1: missing key(s)"),
        (
            '{"user_id":"u","arm":"control","experiment":"synthetic","timestamp":1,"rank":0,'
            '"requested":false,"bytes_up":0,"bytes_down":0}',
            "rank 0 is not 1-based",
        ),
    ],
)
def test_bad_event_logs_are_one_line_errors(
    tmp_path: Path, capsys, line: str, message: str
) -> None:
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(TOML.format(extra=""))
    log = tmp_path / "events.jsonl"
    log.write_text(line + "\n")
    code = main(
        [
            "abtest",
            "analyze",
            "--events",
            str(log),
            "--experiment",
            str(exp_file),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_user_switching_arms_and_replay_only_metrics(tmp_path: Path, capsys) -> None:
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(TOML.format(extra=""))
    base = {
        "experiment": "synthetic",
        "timestamp": T0,
        "rank": 3,
        "requested": False,
        "bytes_up": 0,
        "bytes_down": 0,
        "user_id": "u1",
    }
    log = tmp_path / "events.jsonl"
    log.write_text(
        json.dumps({**base, "arm": "control"}) + "\n" + json.dumps({**base, "arm": "good"}) + "\n"
    )
    assert (
        main(
            [
                "abtest",
                "analyze",
                "--events",
                str(log),
                "--experiment",
                str(exp_file),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "must keep one arm" in capsys.readouterr().err
    auc_file = tmp_path / "auc.toml"
    auc_file.write_text(TOML.format(extra="").replace('["hr@10"]', '["auc"]'))
    log.write_text(json.dumps({**base, "arm": "control"}) + "\n")
    assert (
        main(
            [
                "abtest",
                "analyze",
                "--events",
                str(log),
                "--experiment",
                str(auc_file),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "needs the per-event field 'auc'" in capsys.readouterr().err


def test_cli_errors_are_clean(tmp_path: Path, capsys) -> None:
    cases = [
        (["abtest", "analyze", str(tmp_path / "nowhere")], "not found"),
        (["abtest", "analyze"], "give the directory"),
        (["abtest", "analyze", str(tmp_path)], "experiment.json not found"),
        (["abtest", "analyze", "--events", "x.jsonl"], "--events needs --experiment"),
        (
            ["abtest", "run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")],
            "experiment file",
        ),
        (["abtest", "validate", "--out", str(tmp_path), "--simulations", "3"], "--simulations"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    # a run directory whose tables are broken
    exp = experiment(weights=(0.5, 0.5))
    ids, arms, ev, pre = events(exp, users=50, per_user=3)
    users, daily = summarise(ids, arms, ev, metrics=exp.metrics, start=T0, pre_events=pre)
    write_tables(tmp_path, users, daily)
    (tmp_path / "experiment.json").write_text(json.dumps(exp.to_dict()))
    assert main(["abtest", "analyze", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "daily.csv").write_text("day,user_id\n")
    assert main(["abtest", "analyze", str(tmp_path)]) == 2
    assert "daily.csv, line 1: header must be" in capsys.readouterr().err


def test_event_log_skips_events_before_min_history(tmp_path: Path) -> None:
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(TOML.format(extra=""))
    from recsys.abtest.experiment import load_experiment

    exp = load_experiment(exp_file)
    log = tmp_path / "events.jsonl"
    write_log(log, exp)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    ours = [r for r in lines if r["experiment"] == exp.name]
    for i, rec in enumerate(ours):
        rec["history_len"] = i % 10  # 0..9: half of them below 5
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    _, _, info = read_event_log(log, exp, min_history=5)
    expected_short = sum(1 for i in range(len(ours)) if i % 10 < 5)
    assert info["short_history_lines"] == expected_short
    assert info["events"] == len(ours) - expected_short
    _, _, everything = read_event_log(log, exp, min_history=0)
    assert everything["events"] == len(ours)
