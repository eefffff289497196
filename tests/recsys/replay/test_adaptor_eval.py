"""``recsys eval adaptor`` is a preset of the replay core: its four policies give exactly
the figures of the same policies replayed by ``run_replay``, requests follow the timer,
and the command prints its tables, writes --json and fails cleanly without artefacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.cli import main
from recsys.errors import ValidationError
from recsys.replay.adaptor_eval import POLICIES, EvalConfig, adaptor_policies, evaluate_adaptor
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.engine import run_replay


def test_policies_are_the_cores_with_a_timer() -> None:
    specs = adaptor_policies(3)
    assert [s.label for s in specs] == list(POLICIES)
    assert [s.kind for s in specs] == ["static", "system", "system", "duet"]
    assert [s.prototypes for s in specs[1:3]] == [False, True]
    assert all(s.trigger == "timer" and s.period == 3 for s in specs[1:])
    with pytest.raises(ValidationError, match="min_history"):
        EvalConfig(min_history=1)
    with pytest.raises(ValidationError, match="prototype_sync"):
        EvalConfig(prototype_sync="lazy")  # gone: the core freezes the bank


def test_eval_adaptor_equals_the_replay_of_the_same_policies(world) -> None:
    res = evaluate_adaptor(
        EvalConfig(min_history=3, negatives=10, refresh_every=3),
        world.ds,
        cache=world.cache,
        progress=False,
    )
    assert res["order"] == list(POLICIES) and res["eval_config"]["refresh_every_resolved"] == 3
    cfg = ReplayConfig(min_history=3, negatives=10)
    same = [
        PolicySpec(kind="static"),
        PolicySpec(kind="system", trigger="timer", budget=1 / 3, prototypes=False),
        PolicySpec(kind="system", trigger="timer", budget=1 / 3),
        PolicySpec(kind="duet", trigger="timer", budget=1 / 3),
    ]
    run = run_replay(world.ds, cfg, same, cache=world.cache, progress=False)
    for name, spec in zip(POLICIES, same, strict=True):
        mine, core = (
            res["policies"][name],
            run.costs[spec.label] | run.records[spec.label].summary(),
        )
        for key in ("events", "ndcg@10", "hr@10", "uauc", "requests", "uplink_bytes_total"):
            assert mine[key] == core[key], (name, key)
    timer = run.records[same[2].label]
    for u in np.unique(timer.user):  # every 3 events after the first request
        assert (np.diff(np.flatnonzero(timer.requested[timer.user == u])) == 3).all()
    base = res["policies"]["static base"]
    assert base["requests"] == 0 and res["policies"]["adaptor + prototypes"]["requests"] > 0
    assert res["policies"]["adaptor (no prototypes)"]["prototype_downloads"] == 0


def test_cli_eval_adaptor_prints_tables_and_writes_json(world, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval.json"
    rc = main(["eval", "adaptor", "--dataset", str(world.root), "--cache-dir", str(world.cache),
               "--no-progress", "--min-history", "3", "--negatives", "10", "--payload", "int8",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    for text in (*POLICIES, "Replay: full-catalogue ranking", "Cost per policy", "every 3 events"):
        assert text in printed, text
    res = json.loads(out.read_text())
    assert (
        set(res["policies"]) == set(POLICIES) and res["meta"]["config"]["payload_dtype"] == "int8"
    )
    assert res["meta"]["stream"]["evaluated_cold_user_events"] > 0 and "versions" in res
    p = res["policies"]["adaptor + prototypes"]
    assert (
        f"{p['ndcg@10']:.4f}" in printed and p["ndcg@10_diff_ci95"][0] <= p["ndcg@10_diff_ci95"][1]
    )


def test_cli_eval_adaptor_without_artefacts_says_what_to_train(world, tmp_path, capsys) -> None:
    rc = main(["eval", "adaptor", "--dataset", str(world.root), "--cache-dir",
               str(tmp_path / "empty"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "recsys train adaptor" in capsys.readouterr().err
