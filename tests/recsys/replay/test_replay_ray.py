"""The per-device replay on Ray gives exactly the results of ``--workers 2`` (spawned
processes) on the tiny world; without Ray the error names the extra to install.

Ray 2.60 removed ``local_mode`` (``ray.init(local_mode=True)`` raises), so the test starts
a real local Ray instance (2 logical CPUs, no dashboard, worker logs not forwarded) and
the backend uses that connection.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest

from recsys.cli import main
from recsys.errors import RecsysError
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.engine import run_replay
from recsys.replay.ray_backend import INSTALL_HINT, replay_on_ray

CFG = ReplayConfig(min_history=3, negatives=10, gate_window=4, workers=2, chunk_users=4)
POLICIES = [
    PolicySpec("static"),
    PolicySpec("finetune", finetune_every=3),
    PolicySpec("system", "gate", 0.3),
    PolicySpec("duet", "timer", 0.5),
]
# cost figures that do not depend on timing
EXACT_COSTS = (
    "requests",
    "uplink_bytes_total",
    "downlink_bytes_total",
    "device_flops_per_request",
    "prototype_downloads",
)


@pytest.mark.slow  # two spawned workers, then a Ray instance with two actors
def test_ray_replay_equals_spawned_workers_exactly(world) -> None:
    ray = pytest.importorskip("ray")
    two = run_replay(world.ds, CFG, POLICIES, cache=world.cache, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_replay(
            world.ds, replace(CFG, ray="local"), POLICIES, cache=world.cache, progress=False
        )
        assert ray.is_initialized()  # the caller's connection is left open
    finally:
        ray.shutdown()
    assert on_ray.meta["config"]["ray"] == "local"
    assert set(on_ray.records) == set(two.records) == {s.label for s in POLICIES}
    users = np.unique(two.records["static"].user).tolist()
    assert len(users) > CFG.chunk_users * CFG.workers  # several blocks per actor
    for label, rec in two.records.items():
        other = on_ray.records[label]
        for field in ("user", "item", "timestamp", "rank", "auc", "requested"):
            assert np.array_equal(getattr(rec, field), getattr(other, field)), (label, field)
        for u in users:  # per user, as the per_user.json compares them
            a, b = rec.for_users([u]), other.for_users([u])
            assert np.array_equal(a.rank, b.rank) and np.array_equal(a.auc, b.auc), (label, u)
        for key in EXACT_COSTS:
            assert two.costs[label].get(key) == on_ray.costs[label].get(key), (label, key)
    assert on_ray.costs["system gate 30%"]["requests"] > 0


def test_missing_ray_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RecsysError, match=r"pip install -e \.\[ray\]"):
        replay_on_ray((), [[]], address="local", workers=1)
    assert INSTALL_HINT == "pip install -e .[ray]"


@pytest.mark.parametrize("mode", [["--out", "o", "--via", "grpc"], ["--parity"]])
def test_cli_refuses_ray_outside_the_in_process_replay(world, capsys, mode) -> None:
    rc = main(["replay", "--dataset", str(world.root), "--cache-dir", str(world.cache),
               "--no-progress", "--ray", *mode])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--ray runs the in-process replay only" in err and "Traceback" not in err
