"""The cloud's pooled evidence (recsys.serving.fleet_guard) decides as the offline replay.

The cloud may not import device_ranker, so the fleet guard has its own copy of the two
tests; these checks hold it to ``device_ranker.guard.harm_test`` / ``benefit_test`` and to
the replay's clustered sums (``recsys.replay.guard._clustered_sums``), on random
evidence, with reports replaced (cumulative) as devices send them.
"""

from __future__ import annotations

import numpy as np
import pytest

from device_ranker.guard import GuardConfig, benefit_test, harm_test
from recsys.errors import ValidationError
from recsys.replay.guard import _clustered_sums
from recsys.serving.fleet_guard import APPLY, HOLD, FleetEvidence, FleetGuardConfig


def _random_clicks(rng: np.random.Generator, devices: int, clicks: int, shift: float):
    device = rng.integers(devices, size=clicks)  # [N] in time order
    diff = np.clip(rng.normal(shift, 0.2, size=clicks), -0.99, 0.99)  # [N]
    return device, diff


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shift", [-0.05, 0.0, 0.08])
def test_pooled_sums_and_decisions_match_the_replay(seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    device, diff = _random_clicks(rng, devices=6, clicks=300, shift=shift)
    cfg = GuardConfig(z=1.645, margin=0.0, min_evidence=3)
    harm = FleetEvidence(FleetGuardConfig(mode="harm", min_devices=1))
    proof = FleetEvidence(FleetGuardConfig(mode="proof", min_devices=1))
    c_ss, c_sn, c_nn = _clustered_sums(device, diff, np.ones(len(diff), bool))
    sums: dict[int, list[float]] = {}
    for k, (u, d) in enumerate(zip(device.tolist(), diff.tolist(), strict=True)):
        n, s, q = sums.setdefault(u, [0.0, 0.0, 0.0])
        sums[u] = [n + 1, s + d, q + d * d]
        for fleet in (harm, proof):  # the device's cumulative report after each click
            fleet.report(str(u), int(n + 1), s + d, q + d * d)
        if k % 25:
            continue
        total, squares = diff[: k + 1].sum(), (diff[: k + 1] ** 2).sum()
        assert proof.n == k + 1 and proof.s == pytest.approx(total, abs=1e-9)
        assert (proof.c_ss, proof.c_sn, proof.c_nn) == pytest.approx(
            (c_ss[k + 1], c_sn[k + 1], c_nn[k + 1]), abs=1e-8
        )
        mean = total / (k + 1)
        var = (c_ss[k + 1] - 2 * mean * c_sn[k + 1] + mean**2 * c_nn[k + 1]) / (k + 1) ** 2
        want_harm = bool(harm_test(total, squares, k + 1, cfg))
        want_proof = bool(benefit_test(total, k + 1, var, cfg))
        assert harm.decide() == (APPLY if want_harm else HOLD)
        assert proof.decide() == (APPLY if want_proof else HOLD)


def test_proof_needs_several_devices_and_harm_applies_without_evidence() -> None:
    proof = FleetEvidence(FleetGuardConfig(mode="proof"))
    harm = FleetEvidence(FleetGuardConfig(mode="harm"))
    assert proof.decide() == HOLD and harm.decide() == APPLY  # no evidence
    proof.report("a", 100, 30.0, 10.0)  # strong benefit, one device: clustered var 0
    assert proof.decide() == HOLD
    proof.report("b", 100, 28.0, 9.0)
    assert proof.decide() == APPLY and proof.devices == 2
    proof.report("a", 0, 0.0, 0.0)  # a device's report is replaced, not added
    assert proof.devices == 1 and proof.n == 100 and proof.decide() == HOLD
    assert proof.decisions == {APPLY: 1, HOLD: 3}


def test_harm_at_level_zero_holds_on_any_negative_pooled_mean() -> None:
    # the expected-value setting (--fleet-guard harm --fleet-guard-z 0): apply without
    # evidence and while the pooled mean gain is >= 0, hold as soon as it is below 0
    ev = FleetEvidence(FleetGuardConfig(mode="harm", z=0.0))
    at_5pct = FleetEvidence(FleetGuardConfig(mode="harm"))
    assert ev.decide() == APPLY
    for fleet in (ev, at_5pct):
        fleet.report("a", 50, -0.5, 2.0)  # mean -0.01, sd 0.2: far from significant
        fleet.report("b", 50, 0.3, 2.0)  # pooled mean -0.002
    assert ev.decide() == HOLD and at_5pct.decide() == APPLY
    ev.report("b", 60, 0.7, 2.5)  # pooled mean +0.0018
    assert ev.decide() == APPLY


def test_off_mode_decides_nothing_and_bad_reports_change_nothing() -> None:
    assert FleetEvidence(FleetGuardConfig()).decide() is None
    fleet = FleetEvidence(FleetGuardConfig(mode="harm", max_devices=2))
    fleet.report("a", 10, -1.0, 0.5)
    for bad in [(3, 4.0, 3.0), (3, 0.0, 3.5), (4, 1.9, 0.5), (2, float("inf"), 0.0)]:
        with pytest.raises(ValidationError, match="guard_evidence"):
            fleet.report("a", *bad)
    assert (fleet.n, fleet.s, fleet.q, fleet.devices) == (10, -1.0, 0.5, 1)
    fleet.report("b", 5, 0.5, 0.1)
    fleet.report("c", 5, 0.5, 0.1)  # beyond max_devices: the oldest report ("a") goes
    assert fleet.devices == 2 and fleet.n == 10 and fleet.s == pytest.approx(1.0)
