"""The in-process edits: the system without prototypes (same request points, the
adaptor's own edit, no prototype downloads) next to the full system, whose figures it
leaves unchanged. (The token input itself: tests/recsys/test_adaptor_inputs.py and the
training/serving parity test.)"""

from __future__ import annotations

import numpy as np
import torch

from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.costs import PROTOTYPE_REF_BYTES
from recsys.replay.engine import prepare_replay, run_replay
from recsys.replay.replayer import Replayer

CFG = ReplayConfig(min_history=3, negatives=10, gate_window=4)


def test_system_without_prototypes_next_to_the_full_system(world) -> None:
    static = PolicySpec(kind="static")
    full = PolicySpec(kind="system", trigger="timer", budget=0.3)
    bare = PolicySpec(kind="system", trigger="timer", budget=0.3, prototypes=False)
    run = run_replay(world.ds, CFG, [static, full, bare], cache=world.cache, progress=False)
    a, b = run.records[full.label], run.records[bare.label]
    assert np.array_equal(a.requested, b.requested)  # one trigger: the same request points
    assert not np.array_equal(b.rank, run.records["static"].rank)
    ca, cb = run.costs[full.label], run.costs[bare.label]
    assert ca["requests"] == cb["requests"] > 0
    assert cb["prototype_downloads"] == 0 < ca["prototype_downloads"]
    assert (
        ca["uplink_bytes_total"] - cb["uplink_bytes_total"] == PROTOTYPE_REF_BYTES * ca["requests"]
    )
    # the two share one generation per request point; the full system's figures are those
    # of a replay without the variant
    alone = run_replay(world.ds, CFG, [static, full], cache=world.cache, progress=False)
    assert np.array_equal(alone.records[full.label].rank, a.rank)
    assert np.array_equal(alone.records[full.label].auc, a.auc)


def test_the_two_adaptor_variants_apply_different_edits(world) -> None:
    specs = [PolicySpec(kind="system", trigger="timer", budget=0.3)]
    specs.append(PolicySpec(kind="system", trigger="timer", budget=0.3, prototypes=False))
    prep = prepare_replay(world.ds, CFG, specs, cache=world.cache)
    rep = Replayer(prep.art_path, world.cache, world.ds.name, CFG, specs, prep.calibrations)
    try:
        ev = prep.events()[0]
        seq = ev.sequence
        points = np.array([len(ev.start), len(ev.start) + 1], dtype=np.int64)
        states = rep.states(seq, points)
        both = {"system": set(points.tolist()), "system-noproto": set(points.tolist())}
        edits = rep.edits.cloud_edits("adaptor", seq, points, states, both)
        for length in points.tolist():
            full, bare = edits["system"][length], edits["system-noproto"][length]
            assert full.prototype is not None and bare.prototype is None
            (w_full, _), (w_bare, _) = full.prepared.weights[0], bare.prepared.weights[0]
            assert not torch.equal(w_full, w_bare)
    finally:
        rep.close()


def test_system_refine_refines_the_adaptors_edit_at_the_same_request_points(world) -> None:
    bare = PolicySpec.parse("system-noproto:timer:0.3")
    refine = PolicySpec.parse("system-refine:timer:0.3")
    assert refine.label == "system-refine timer 30%" and refine.edit_kind == "system-refine"
    assert PolicySpec.from_dict(refine.to_dict()) == refine
    specs = [PolicySpec(kind="static"), bare, refine]
    run = run_replay(world.ds, CFG, specs, cache=world.cache, progress=False)
    a, b = run.records[bare.label], run.records[refine.label]
    np.testing.assert_array_equal(a.requested, b.requested)  # the same requests...
    assert not np.array_equal(a.rank, b.rank)  # ...answered with refined edits
    ca, cb = run.costs[bare.label], run.costs[refine.label]
    assert ca["requests"] == cb["requests"] > 0
    assert cb["uplink_bytes_per_request"] > ca["uplink_bytes_per_request"]  # the states
    assert cb["prototype_downloads"] == 0 and cb["device_flops_total"] == ca["device_flops_total"]
    again = run_replay(world.ds, CFG, [refine], cache=world.cache, progress=False)
    np.testing.assert_array_equal(again.records[refine.label].rank, b.rank)  # deterministic
    off = run_replay(
        world.ds, CFG.__class__(**{**CFG.to_dict(), "refine": {"steps": 0}}), [bare, refine],
        cache=world.cache, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(off.records[bare.label].rank, off.records[refine.label].rank)


def test_refine_needs_an_absolute_system_edit_and_the_noproto_edit_no_service() -> None:
    import pytest

    from recsys.errors import ValidationError
    from recsys.replay.services import check_grpc_policies

    with pytest.raises(ValidationError, match="refine=True applies to system policies"):
        PolicySpec(kind="system", refine=True)
    with pytest.raises(ValidationError, match="in process only"):
        check_grpc_policies([PolicySpec.parse("system-noproto:gate:0.2")])
    assert check_grpc_policies([PolicySpec.parse("system-refine:gate:0.2")])  # it has one
