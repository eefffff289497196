"""Hash assignment: deterministic, the same in another process, proportions as configured."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from recsys.abtest.assignment import assign_arm, assign_arms, unit_draw, unit_draws
from recsys.errors import ValidationError

ARMS = [("control", 0.5), ("a", 0.3), ("b", 0.2)]


@settings(max_examples=200, deadline=None)
@given(salt=st.text(max_size=20), user=st.text(min_size=1, max_size=30))
def test_deterministic_and_in_range(salt: str, user: str) -> None:
    u = unit_draw(salt, user)
    assert 0.0 <= u < 1.0
    assert unit_draw(salt, user) == u
    assert assign_arm(salt, user, ARMS) == assign_arm(salt, user, ARMS)
    assert unit_draws(salt, [user])[0] == u


def test_same_arms_in_another_process() -> None:
    users = [f"u{i}" for i in range(200)]
    here = [assign_arm("exp-7", u, ARMS) for u in users]
    code = (
        "from recsys.abtest.assignment import assign_arm\n"
        f"arms = {ARMS!r}\n"
        "print(','.join(assign_arm('exp-7', f'u{i}', arms) for i in range(200)))\n"
    )
    # a fresh interpreter with a different hash seed: Python's hash() would differ
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert out.stdout.strip().split(",") == here


def test_vectorised_equals_scalar_and_salt_matters() -> None:
    users = [str(i) for i in range(500)]
    idx = assign_arms("s", users, ARMS)
    names = [a for a, _ in ARMS]
    assert [names[i] for i in idx] == [assign_arm("s", u, ARMS) for u in users]
    other = assign_arms("s2", users, ARMS)
    assert (idx != other).mean() > 0.3  # a new salt re-randomises


def test_proportions_match_the_weights() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    counts = np.bincount(assign_arms("prop", users, ARMS), minlength=3)
    expected = np.array([w for _, w in ARMS]) * len(users)
    assert sps.chisquare(counts, expected).pvalue > 1e-3
    # unit draws are uniform
    assert sps.kstest(unit_draws("prop", users), "uniform").pvalue > 1e-3


def test_zero_weight_arm_gets_nobody_and_bad_weights() -> None:
    users = [str(i) for i in range(2000)]
    idx = assign_arms("z", users, [("a", 0.5), ("never", 0.0), ("b", 0.5)])
    assert 1 not in idx
    with pytest.raises(ValidationError, match="sum to"):
        assign_arm("s", "u", [("a", 0.5), ("b", 0.4)])
    with pytest.raises(ValidationError, match="duplicate"):
        assign_arm("s", "u", [("a", 0.5), ("a", 0.5)])
    with pytest.raises(ValidationError, match="non-empty"):
        assign_arm("s", "", [("a", 1.0)])


def test_assignments_persist_once_and_survive_a_weight_change(tmp_path) -> None:
    from codebook.store import PrototypeStore
    from recsys.abtest.experiment import experiment_from_dict
    from recsys.abtest.persist import persist_assignments, stored_arm_counts

    exp = experiment_from_dict(
        {
            "name": "p",
            "salt": "p-salt",
            "primary_metric": "ndcg@10",
            "arms": [
                {"name": "a", "weight": 0.5, "policy": {"kind": "static"}},
                {"name": "b", "weight": 0.5, "policy": {"kind": "system"}},
            ],
        }
    )
    users = [f"u{i}" for i in range(300)]
    with PrototypeStore.open(f"sqlite:///{tmp_path / 's.sqlite'}", upgrade=True) as store:
        first = persist_assignments(store, exp, users)
        assert first == {u: exp.assign(u).name for u in users}
        assert persist_assignments(store, exp, users) == first  # idempotent
        counts = stored_arm_counts(store, exp)
        assert sum(counts.values()) == 300
        # the same experiment with other weights is refused: a new name is needed
        d = exp.to_dict()
        d["arms"][0]["weight"], d["arms"][1]["weight"] = 0.9, 0.1
        moved = experiment_from_dict(d)
        with pytest.raises(ValidationError, match="choose a new name"):
            persist_assignments(store, moved, users)
