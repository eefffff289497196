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
