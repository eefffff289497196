"""Experiment files: the examples load, every mistake is a clear error naming file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.abtest.experiment import experiment_from_dict, load_experiment
from recsys.errors import DataFormatError, NotFoundError, ValidationError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "experiments"

GOOD = """
name = "t"
salt = "s1"
primary_metric = "ndcg@10"
guardrail_metrics = ["hr@10"]

[[arms]]
name = "control"
weight = 0.5
policy = { kind = "static" }

[[arms]]
name = "treat"
weight = 0.5
policy = { kind = "system", trigger = "gate", budget = 0.2 }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_examples_load() -> None:
    files = sorted(EXAMPLES.glob("*.toml"))
    assert files
    for f in files:
        exp = load_experiment(f)
        assert abs(sum(a.weight for a in exp.arms) - 1) < 1e-9
        assert exp.control in [a.name for a in exp.arms]


def test_good_file_and_round_trip(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, GOOD))
    assert exp.control == "control"  # default: the first arm
    assert exp.arm_pairs == [("control", 0.5), ("treat", 0.5)]
    assert exp.arm("treat").policy == {"kind": "system", "trigger": "gate", "budget": 0.2}
    assert exp.metrics == ["ndcg@10", "hr@10"]
    back = experiment_from_dict(json.loads(json.dumps(exp.to_dict())))
    assert back.to_dict() == exp.to_dict()
    assert exp.assign("user-1").name in ("control", "treat")


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        (
            'weight = 0.5\npolicy = { kind = "static" }',
            'weight = 0.6\npolicy = { kind = "static" }',
            r"arms.weight: the weights \[0.6, 0.5\] sum to 1.1",
        ),
        ('name = "treat"', 'name = "control"', r"arms: duplicate arm name\(s\) \['control'\]"),
        (
            'primary_metric = "ndcg@10"',
            'primary_metric = "ndcg@20"',
            r"primary_metric: Input should be 'ndcg@10', .* \(got 'ndcg@20'\)",
        ),
        (
            '["hr@10"]',
            '["hr@10", "clicks"]',
            r"guardrail_metrics.1: Input should be .* \(got 'clicks'\)",
        ),
        ('["hr@10"]', '["ndcg@10"]', "list each metric once"),
        (
            'kind = "system"',
            'kind = "magic"',
            r"arms.1.policy.kind: Input should be 'static', .* \(got 'magic'\)",
        ),
        (
            'trigger = "gate"',
            'trigger = "cron"',
            r"arms.1.policy.trigger: Input should be 'gate' or 'timer' \(got 'cron'\)",
        ),
        (
            "budget = 0.2",
            "budget = 1.5",
            r"arms.1.policy.budget: Input should be less than or equal to 1 \(got 1.5\)",
        ),
        (
            "budget = 0.2",
            "budget = 0",
            r"arms.1.policy.budget: Input should be greater than 0 \(got 0\)",
        ),
        ("budget = 0.2", "budgett = 0.2", r"arms.1.policy.budgett: Extra inputs are not permitted"),
        ('salt = "s1"', "", "salt: Field required"),
        (
            'salt = "s1"',
            'salt = "s1"\ncolour = "red"',
            r"colour: Extra inputs are not permitted \(got 'red'\)",
        ),
        ('name = "t"', 'name = "t"\ncontrol = "nobody"', "control: 'nobody' is not an arm"),
        (
            '{ kind = "static" }',
            '{ kind = "static", budget = 0.5 }',
            r"arms.0.policy: a static policy never requests",
        ),
        # strict types: no quoted numbers, no booleans as integers, no blank names
        ("weight = 0.5", 'weight = "0.5"', r"arms.0.weight: Input should be a valid number"),
        ('name = "t"', 'name = " "', r"name: must not be blank \(got ' '\)"),
        (
            "budget = 0.2 }",
            "budget = 0.2, finetune_every = 3 }",
            "finetune_every only applies to kind 'finetune'",
        ),
    ],
)
def test_mistakes_name_the_file_and_field(tmp_path: Path, old: str, new: str, match: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ValidationError, match=match) as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_one_arm_and_bad_analysis(tmp_path: Path) -> None:
    one = GOOD[: GOOD.index('[[arms]]\nname = "treat"')].replace("weight = 0.5", "weight = 1.0")
    with pytest.raises(ValidationError, match=r"arms: an experiment needs at least two"):
        load_experiment(write(tmp_path, one))
    with pytest.raises(ValidationError, match=r"analysis\.alpha: .* less than or equal to 0.5"):
        load_experiment(write(tmp_path, GOOD + "\n[analysis]\nalpha = 0.9\n"))
    with pytest.raises(ValidationError, match=r"replay\.pre_period_events"):
        load_experiment(write(tmp_path, GOOD + "\n[replay]\npre_period_events = -1\n"))
    with pytest.raises(
        ValidationError, match=r"analysis\.bootstrap: Input should be a valid integer"
    ):
        load_experiment(write(tmp_path, GOOD + "\n[analysis]\nbootstrap = true\n"))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        load_experiment(tmp_path / "missing.toml")
    with pytest.raises(DataFormatError, match="invalid TOML"):
        load_experiment(write(tmp_path, "name = \n"))


def test_an_arm_can_run_a_harm_guard_offline(tmp_path: Path) -> None:
    from recsys.abtest.runner import arm_policies

    guarded = "budget = 0.2, guard = true, fleet_guard = true, guard_z = 0.0 }"
    exp = load_experiment(write(tmp_path, GOOD.replace("budget = 0.2 }", guarded)))
    arm_label, specs = arm_policies(exp)
    assert arm_label["treat"] == "system gate 20% fleet-guard z=0"
    (spec,) = [s for s in specs if s.label == arm_label["treat"]]
    assert spec.guard and spec.fleet_guard and not spec.fleet_proof and spec.guard_z == 0.0
    assert load_experiment(EXAMPLES / "guarded-vs-unguarded.toml").arm("system-10-guarded")
    for bad, words in [
        ("budget = 0.2, fleet_guard = true }", "fleet_guard = true needs guard = true"),
        ("budget = 0.2, guard = true, fleet_proof = true }", "fleet_proof = true needs"),
        ("budget = 0.2, guard = true, guard_z = 1.0 }", "guard_z is the fleet guard's level"),
        (
            "budget = 0.2, guard = true, fleet_guard = true, guard_z = -1.0 }",
            "greater than or equal to 0",
        ),
    ]:
        with pytest.raises(ValidationError, match=words):
            load_experiment(write(tmp_path, GOOD.replace("budget = 0.2 }", bad)))
    with pytest.raises(ValidationError, match="guard applies to duet and system"):
        load_experiment(
            write(
                tmp_path, GOOD.replace('{ kind = "static" }', '{ kind = "static", guard = true }')
            )
        )
