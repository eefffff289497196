"""``system-refine`` through the REAL services (issue 13 item 1): the device server uplinks
its recent user states, the cloud server refines the adaptor's edit on them and sends it
whole; the gRPC replay matches the in-process one (same requests, ranks within the
tolerance of the other policies' parity), and ``recsys replay --parity`` reports it.

The states go up in fp32 (``recsys.replay.services.REFINE_STATE_DTYPE``).
"""

from __future__ import annotations

import numpy as np
import pytest

from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.engine import run_replay
from recsys.replay.parity import parity_rows
from recsys.replay.services import REFINE_STATE_DTYPE, check_grpc_policies, device_argv

pytestmark = pytest.mark.slow

CFG = ReplayConfig(negatives=8, max_users=6, seed=5)
REFINE = PolicySpec.parse("system-refine:timer:0.3")
POLICIES = [PolicySpec("static"), REFINE, PolicySpec("system", "timer", 0.3)]


def test_refine_policies_get_a_service_and_the_device_uplinks_states(world) -> None:
    assert check_grpc_policies([REFINE]) == [REFINE]
    with pytest.raises(Exception, match="in process only"):
        check_grpc_policies([PolicySpec.parse("system-noproto:timer:0.3")])
    from codebook.adaptor_artifact import load_artifact

    art = load_artifact(world.cache / "artifacts" / world.ds.name / "adaptor" / "adaptor.pt")
    argv = device_argv(REFINE, CFG, art, world.root, {}, "127.0.0.1:1")
    assert argv[argv.index("--uplink-states") + 1] == str(CFG.refine.positions)
    assert argv[argv.index("--state-dtype") + 1] == REFINE_STATE_DTYPE == "fp32"
    plain = device_argv(POLICIES[2], CFG, art, world.root, {}, "127.0.0.1:1")
    assert "--uplink-states" not in plain


def test_grpc_system_refine_matches_in_process(world) -> None:
    local = run_replay(world.ds, CFG, POLICIES, cache=world.cache, progress=False)
    remote = run_replay(world.ds, CFG, POLICIES, cache=world.cache, progress=False, via="grpc")
    for spec in POLICIES:
        a, b = local.records[spec.label], remote.records[spec.label]
        assert len(a) == len(b) > 0, spec.label
        np.testing.assert_array_equal(a.requested, b.requested, err_msg=spec.label)
        moved = int((a.rank != b.rank).sum())
        assert moved <= 1, (spec.label, a.rank, b.rank)
        np.testing.assert_allclose(a.auc, b.auc, atol=1e-5, err_msg=spec.label)
    rec, cost = remote.records[REFINE.label], remote.costs[REFINE.label]
    assert rec.requested.any() and cost["failed_requests"] == 0
    assert cost["prototype_downloads"] == 0  # refined edits go whole
    assert local.costs[REFINE.label]["requests"] == cost["requests"]
    system = remote.costs[POLICIES[2].label]
    assert cost["uplink_bytes_per_request"] > system["uplink_bytes_per_request"]  # the states
    # the refined edits are not the prototype system's: the cloud did refine
    assert not np.array_equal(rec.rank, remote.records[POLICIES[2].label].rank)
    rows = {r["policy"]: r for r in parity_rows(local, remote)}
    assert all(r["matches"] for r in rows.values()), rows
