"""``system-live`` through the REAL services in global time (issue 13 item 5): one cloud
server refining a fresh prototype bank in the store (SQLite; PostgreSQL when the test
server is available), every device's events replayed in stream order; the ranks, AUCs,
requests and the prototype versions written match the in-process global replay with one
request per slice (``slice_s=0``).

The artefact is the tiny world's with a bank that moves: a prototype refined every 2
members (running mean capped at 4), a small residual share (so the prototype, not only
the residual, shapes the edit) and a low spawn threshold (prototypes spawn).
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from codebook.adaptor_artifact import load_artifact
from codebook.store import PrototypeStore
from recsys import settings
from recsys.errors import ValidationError
from recsys.replay.config import GrpcOptions, PolicySpec, ReplayConfig
from recsys.replay.engine import prepare_replay, run_replay
from recsys.replay.grpc_global import (
    check_global_policies,
    merged_steps,
    replay_global_through_services,
    store_summary,
)
from recsys.replay.parity import ParityResult, global_parity_rows, parity_rows, replay_versions
from recsys.replay.records import merge_results

pytestmark = pytest.mark.slow

STATIC = PolicySpec("static")
LIVE = PolicySpec.parse("system-live:gate:0.5")
POLICIES = [STATIC, LIVE]


@pytest.fixture(scope="module")
def live_art(world, tmp_path_factory):
    """A copy of the tiny world's artefact whose bank refines and spawns often."""
    art = dict(load_artifact(world.cache / "artifacts" / world.ds.name / "adaptor" / "adaptor.pt"))
    cfg = dict(art["config"])
    cfg["prototypes"] = dict(
        cfg["prototypes"], refine_every=2, max_count=4, spawn_window=6, spawn_fraction=0.5,
        residual_share=0.05, residual_rank=1,
    )  # fmt: skip
    art["config"] = cfg
    art["prototypes"] = dict(art.get("prototypes", {}), spawn_threshold=0.02)
    path = tmp_path_factory.mktemp("live-art") / "adaptor.pt"
    torch.save(art, path)
    return path


def _cfg(art_path, **over) -> ReplayConfig:
    return ReplayConfig(min_history=3, negatives=10, gate_window=4, seed=1,
                        artifact=str(art_path), **over)  # fmt: skip


def _through_services(world, cfg, specs):
    """The gRPC global replay, called directly (run_replay routes to it once wired)."""
    prep = prepare_replay(world.ds, cfg, specs, cache=world.cache)
    results, extra = replay_global_through_services(
        world.ds, cfg, specs, prep, prep.events(), cache=world.cache, options=GrpcOptions(),
        progress=False,
    )  # fmt: skip
    records, costs = merge_results(results, [s.label for s in specs])
    return records, costs, extra, prep


def _check_parity(world, art_path, store_url: str) -> None:
    local_url = store_url
    cfg = _cfg(art_path, store_url=store_url)
    before = replay_versions(local_url)
    local = run_replay(world.ds, dataclasses.replace(cfg, slice_s=0.0), POLICIES,
                       cache=world.cache, progress=False)  # fmt: skip
    local_versions = replay_versions(local_url) - before
    records, costs, extra, _ = _through_services(world, cfg, POLICIES)
    for spec in POLICIES:
        a, b = local.records[spec.label], records[spec.label]
        assert len(a) == len(b) > 0, spec.label
        np.testing.assert_array_equal(a.user, b.user)
        np.testing.assert_array_equal(a.requested, b.requested, err_msg=spec.label)
        np.testing.assert_array_equal(a.rank, b.rank, err_msg=spec.label)
        np.testing.assert_allclose(a.auc, b.auc, atol=1e-6, err_msg=spec.label)
    assert costs[LIVE.label]["requests"] == local.costs[LIVE.label]["requests"] > 20
    assert costs[LIVE.label]["failed_requests"] == 0
    g, h = local.meta["global_time"], extra["global_time"]
    assert h["requests"] == g["requests"]
    for key in ("versions_written", "refinements", "spawned", "prototypes"):
        assert h["prototypes"][key] == g["prototypes"][key], key
    assert g["prototypes"]["refinements"] > 5 and g["prototypes"]["spawned"] >= 1
    assert (
        h["store"]["versions"]
        == local_versions
        == 3 + g["prototypes"]["refinements"] + (g["prototypes"]["spawned"])
    )
    assert h["store"]["writes"] == g["store"]["writes"]  # versions + device assignments
    assert h["store_backend"] == store_url.split(":", 1)[0]
    assert all(store_url not in " ".join(s["argv"]) for s in extra["servers"].values())
    with PrototypeStore.open(store_url) as store:  # the cloud's bank is in the store
        assert store_summary(store, h["name_prefix"])["versions"] == h["store"]["versions"]
    # the parity rows say so (the per-event ones and the bank's)
    remote = dataclasses.replace(local, records=records, meta={**local.meta, "global_time": h})
    res = ParityResult(
        local, remote, {}, {"inprocess": local_versions, "grpc": h["store"]["versions"]}
    )
    assert all(r["matches"] for r in parity_rows(local, remote))
    (bank,) = global_parity_rows(res)
    assert bank["matches"] and bank["store versions grpc"] == h["store"]["versions"]


def test_grpc_global_replay_matches_in_process_sqlite(world, live_art, tmp_path) -> None:
    _check_parity(world, live_art, f"sqlite:///{tmp_path / 'store.sqlite'}")


@pytest.fixture
def pg_url():
    """A new, empty database on the test PostgreSQL server ($RECSYS_TEST_POSTGRES_URL, which
    .ci/run exports), dropped afterwards; skipped without one."""
    server = settings.postgres_test_url()
    if not server:
        pytest.skip("PostgreSQL is not available: set RECSYS_TEST_POSTGRES_URL (.ci/run does)")
    base = make_url(server)
    name = f"recsys_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield base.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def test_grpc_global_replay_matches_in_process_postgres(world, live_art, pg_url) -> None:
    _check_parity(world, live_art, pg_url)


def test_serving_order_matters(world, live_art, monkeypatch) -> None:
    """The parity is not vacuous: the same devices replayed one after another (not in
    stream order) get other edits and write other versions."""
    cfg = _cfg(live_art, slice_s=0.0)
    local = run_replay(world.ds, cfg, [LIVE], cache=world.cache, progress=False)
    import recsys.replay.grpc_global as gg

    def device_by_device(events):
        return [(0, int(ev.user), n) for ev in events for n in range(len(ev.timestamps))]

    monkeypatch.setattr(gg, "merged_steps", device_by_device)
    records, _, extra, _ = _through_services(world, cfg, [LIVE])
    a, b = local.records[LIVE.label], records[LIVE.label]
    assert (a.rank != b.rank).any() or np.abs(a.auc - b.auc).max() > 1e-6
    assert extra["global_time"]["prototypes"] != local.meta["global_time"]["prototypes"]


def test_merged_order_and_policy_checks(world, live_art) -> None:
    cfg = _cfg(live_art)
    prep = prepare_replay(world.ds, cfg, POLICIES, cache=world.cache)
    events = prep.events()
    steps = merged_steps(events)
    assert steps == sorted(steps) and len(steps) == sum(len(ev.items) for ev in events)
    assert check_global_policies(POLICIES) == LIVE
    with pytest.raises(ValidationError, match="one system-live policy"):
        check_global_policies([LIVE, PolicySpec.parse("system-live:timer:0.5")])
    with pytest.raises(ValidationError, match="in-process global-time replay only"):
        check_global_policies([PolicySpec.parse("system-continual:timer:0.5")])
