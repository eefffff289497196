"""``recsys replay compare``: replays of several artefacts paired user by user.

Synthetic per-user figures: a clearly better arm gets a CI that excludes zero, equal
arms a zero difference, and runs of another dataset version, seed, stream, user set or
setting are refused with a clear message. End to end on the tiny world: ``recsys
replay --out`` writes ``per_user.json`` (whose event-weighted means are the
``results.json`` figures), and the compare CLI reproduces the report's own paired CI
and writes every figure to ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.cli import main
from recsys.errors import NotFoundError, ValidationError
from recsys.replay.compare import LoadedRun, compare_runs, load_run, parse_run
from recsys.replay.config import PolicySpec
from recsys.replay.report import PER_USER_FORMAT

SYSTEM, DUET = PolicySpec("system", "gate", 0.2), PolicySpec("duet", "gate", 0.2)


def synthetic_run(label: str, system: np.ndarray, duet: np.ndarray, **meta) -> LoadedRun:
    """A run of 200 users with 3-7 events each; ``system`` / ``duet``: per-user means."""
    users = np.arange(len(system)) * 3 + 1
    events = 3 + users % 5
    figs = {
        s.label: {"users": users.tolist(), "ndcg@10": v.tolist(), "events": events.tolist(),
                  "events_sha256": "abc"}
        for s, v in ((SYSTEM, system), (DUET, duet))
    }  # fmt: skip
    per_user = {
        "format": PER_USER_FORMAT,
        "metric": "ndcg@10",
        "dataset": {"name": "toy", "fingerprint": "f00"},
        "seed": 0,
        "stream": {"evaluated_users": len(users), "evaluated_events": int(events.sum())},
        "replayed_users": users.tolist(),
        "config": {"negatives": 100, "bootstrap": 500, "artifact": f"{label}.pt", "workers": 1},
        "artifact": f"CACHE/{label}.pt",
        "token_source": label,
        "order": [SYSTEM.label, DUET.label],
        "specs": [SYSTEM.to_dict(), DUET.to_dict()],
        "policies": figs,
    }
    per_user.update(meta)
    return LoadedRun(label, Path(label), per_user, None)


@pytest.fixture
def base() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 0.3, 200)


def test_a_clearly_better_arm_has_a_ci_above_zero(base) -> None:
    noise = np.random.default_rng(1).normal(0, 0.01, 200)
    good = synthetic_run("good", base + 0.05 + noise, base)
    plain = synthetic_run("plain", base, base)
    res = compare_runs([good, plain], SYSTEM.label, ["plain", "duet@plain"])
    rows = {(c["arm"], c["reference"]): c for c in res["comparisons"]}
    assert set(rows) == {("good", "plain"), ("duet@plain", "plain"), ("good", "duet@plain"),
                         ("plain", "duet@plain")}  # fmt: skip
    c = rows[("good", "plain")]
    assert c["ci95"][0] > 0.03 and c["ci95"][1] < 0.07 and c["ci_excludes_zero"]
    assert c["diff"] == pytest.approx(0.05, abs=0.005)
    assert rows[("plain", "duet@plain")]["ci95"] == [0.0, 0.0]  # identical arms
    assert not rows[("plain", "duet@plain")]["ci_excludes_zero"]
    arms = {a["arm"]: a for a in res["arms"]}
    assert arms["duet@plain"]["policy"] == DUET.label  # the kind picked the same budget
    ev = 3 + (np.arange(200) * 3 + 1) % 5
    assert arms["plain"]["ndcg@10"] == pytest.approx(float((base * ev).sum() / ev.sum()))
    assert res["bootstrap"]["resamples"] == 500 and res["seed"] == 0


def test_references_are_paired_users_not_positions(base) -> None:
    a = synthetic_run("a", base + 0.1, base)
    b = synthetic_run("b", base, base)
    fig = b.per_user["policies"][SYSTEM.label]
    fig["users"] = fig["users"][::-1]  # the same users, another order: not pairable as is
    with pytest.raises(ValidationError, match="different users"):
        compare_runs([a, b], SYSTEM.label, ["b"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset": {"name": "toy", "fingerprint": "beef"}}, "different datasets"),
        ({"seed": 1}, "different seeds"),
        ({"stream": {"evaluated_users": 200, "evaluated_events": 1}}, "different streams"),
        ({"replayed_users": [1, 4]}, "different users"),
        (
            {"config": {"negatives": 10, "bootstrap": 500, "artifact": "x", "workers": 4}},
            "different settings",
        ),
    ],
)
def test_mismatched_runs_are_refused(base, change, message) -> None:
    a = synthetic_run("a", base, base)
    b = synthetic_run("b", base, base, **change)
    with pytest.raises(ValidationError, match=message):
        compare_runs([a, b], SYSTEM.label)


def test_other_refusals(base) -> None:
    a = synthetic_run("a", base, base)
    b = synthetic_run("b", base, base, config={"negatives": 10, "bootstrap": 500})
    res = compare_runs([a, b], SYSTEM.label, allow_config_diff=True)
    assert res["config_differences"] == {"b": ["negatives: 100 vs 10"]}
    c = synthetic_run("c", base, base)
    c.per_user["policies"][SYSTEM.label]["events_sha256"] = "other"
    with pytest.raises(ValidationError, match="scored different events"):
        compare_runs([a, c], SYSTEM.label)
    with pytest.raises(ValidationError, match="has no policy 'static'"):
        compare_runs([a, b], "static", allow_config_diff=True)
    with pytest.raises(ValidationError, match="neither a run label"):
        compare_runs([a], SYSTEM.label, ["zzz"])
    with pytest.raises(ValidationError, match="unique"):
        compare_runs([a, a], SYSTEM.label)
    with pytest.raises(ValidationError, match="LABEL=DIR"):
        parse_run("no-equals-sign")
    assert parse_run("x=some/dir") == ("x", Path("some/dir"))


def test_cli_compare_end_to_end(world, tmp_path: Path, capsys) -> None:
    common = ["--dataset", str(world.root), "--cache-dir", str(world.cache), "--no-progress",
              "--negatives", "5", "--max-users", "16",
              "--policies", "static,duet:timer:0.5,system:timer:0.5"]  # fmt: skip
    for label in ("a", "b"):
        assert main(["replay", *common, "--out", str(tmp_path / label)]) == 0
    capsys.readouterr()
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    per_user = json.loads((tmp_path / "a" / "per_user.json").read_text())
    assert "per_user" not in res and per_user["replayed_users"] == res["meta"]["replayed_users"]
    for label, p in res["policies"].items():
        fig = per_user["policies"][label]
        ev = np.asarray(fig["events"])
        assert sum(ev) == p["events"] and len(fig["users"]) == p["users"]
        assert float(np.dot(fig["ndcg@10"], ev) / ev.sum()) == pytest.approx(p["ndcg@10"])

    out = tmp_path / "compare.json"
    rc = main(["replay", "compare", "--run", f"a={tmp_path / 'a'}", "--run",
               f"b={tmp_path / 'b'}", "--policy", "system timer 50%", "--reference", "b",
               "--reference", "duet@a", "--reference", "static@a", "--json", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    js = json.loads(out.read_text())
    assert {"versions", "argv", "config", "dataset", "seed", "stream", "runs"} <= set(js)
    assert js["dataset"]["fingerprint"] == world.ds.fingerprint()
    rows = {(c["arm"], c["reference"]): c for c in js["comparisons"]}
    assert rows[("a", "b")]["diff"] == 0.0  # the same artefact replayed twice
    # the report's own paired CI of system vs DUET at the same trigger and budget
    mine = rows[("a", "duet@a")]
    theirs = next(c for c in res["comparisons"] if c["reference"] == "duet timer 50%"
                  and c["policy"] == "system timer 50%")  # fmt: skip
    assert mine["diff"] == pytest.approx(theirs["diff"], abs=1e-12)
    assert mine["ci95"] == pytest.approx(theirs["ci95"], abs=1e-9)
    static = rows[("a", "static@a")]
    assert static["diff"] == pytest.approx(
        res["policies"]["system timer 50%"]["ndcg@10_diff_to_static"]
    )
    for arm in js["arms"]:
        assert f"{arm['ndcg@10']:.4f}" in printed
    for c in js["comparisons"]:
        assert f"{c['diff']:+.4f}" in printed

    # a run of another seed's stream is refused cleanly
    pu = json.loads((tmp_path / "b" / "per_user.json").read_text())
    pu["seed"] = 7
    (tmp_path / "b" / "per_user.json").write_text(json.dumps(pu))
    rc = main(["replay", "compare", "--run", f"a={tmp_path / 'a'}", "--run",
               f"b={tmp_path / 'b'}", "--policy", "system timer 50%"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "different seeds" in err and "Traceback" not in err
    with pytest.raises(NotFoundError, match="recsys replay --out"):
        load_run("x", tmp_path / "nothing")
