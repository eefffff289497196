"""The device harm guard's state survives a restart (durable device state, schema 2):
a real device server with ``--guard`` on loopback, linked to a real tiny cloud, collects
a user's click evidence and holds a new edit out; a new server on the same state file
has the same evidence (window and cumulative sums, to the bit), the same held candidate
(same payload, same scores), serves the same ranking and status, and keeps holding the
user's next edit on the restored evidence (a device that forgot it would apply it: too
few clicks to judge).

The device-wide guard counters (accepted, rejected, held by the fleet) survive it too,
in GetStatus and in the ``guarded`` metric, and count on from the stored values; a
decision whose state write fails (a real SQLite error inside the write's transaction)
counts nothing and changes nothing, in memory or in the file; a file written before the
counters were stored starts them at zero."""

from __future__ import annotations

import sqlite3
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import cloud_config, device_config

from device_ranker.gate import GateConfig
from device_ranker.guard import GuardConfig, click_gain
from device_ranker.service.server import start_device
from llm_cloud.service.server import start_cloud
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.fleet_guard import FleetGuardConfig
from recsys.serving.server import ServerOptions

# one request when the history reaches min_history, then only RequestEdit asks
ONCE = GateConfig(min_history=2, min_gap=1, budget=0.001)
# a window shorter than the clicks recorded: the stored window drops the oldest
GUARD = GuardConfig(window=4, min_evidence=3, z=0.0)


class _Device:
    """A device server in this process (``--guard``, a state file), with a stub."""

    def __init__(self, bg, artifacts, cloud_port: int, state: Path, **kw) -> None:
        self.bg = bg
        kw = {"guard": True, "guard_settings": GUARD,
              "server": ServerOptions(port=0, metrics_port=0), **kw}  # fmt: skip
        cfg = device_config(artifacts, cloud_port, trigger="timer", gate=ONCE,
                            state_path=str(state), **kw)  # fmt: skip
        self.handle = bg.run(start_device(cfg))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.handle.port}")
        self.stub = pb_grpc.RecommendationServiceStub(self.channel)

    def event(self, user: str, item: str, t: int) -> pb.RecordEventResponse:
        req = pb.RecordEventRequest(user_id=user, item_id=item, timestamp=t, wait_for_edit=True)
        return self.stub.RecordEvent(req, timeout=20)

    def probe_ranks(self, user: str, items: list[str], base: bool) -> np.ndarray:
        req = pb.RecommendRequest(user_id=user, k=1, probe_item_ids=items, base_model=base)
        return np.asarray(self.stub.Recommend(req, timeout=20).probe_ranks)

    def unseen(self, user: str) -> list[str]:
        rec = self.stub.Recommend(pb.RecommendRequest(user_id=user, k=1000), timeout=20)
        return [s.item_id for s in rec.items]

    def status(self, user: str) -> pb.GetStatusResponse:
        return self.stub.GetStatus(pb.GetStatusRequest(user_id=user), timeout=20)

    def counts(self) -> tuple[int, int, int]:
        """GetStatus's device-wide (guard_accepted, guard_rejected, fleet_held)."""
        s = self.stub.GetStatus(pb.GetStatusRequest(), timeout=20)
        return s.guard_accepted, s.guard_rejected, s.fleet_held

    def edits_metric(self) -> dict[str, float]:
        """GET /metrics: ``recsys_device_edits_total`` by outcome."""
        url = f"http://127.0.0.1:{self.handle.server.metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return {
            s.labels["outcome"]: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "recsys_device_edits_total"
        }

    def request_edit(self, user: str) -> pb.RequestEditResponse:
        req = pb.RequestEditRequest(user_id=user, wait_for_edit=True)
        return self.stub.RequestEdit(req, timeout=20)

    def recommend(self, user: str) -> pb.RecommendResponse:
        req = pb.RecommendRequest(user_id=user, k=5, probe_item_ids=["i0", "i1", "i29"])
        return self.stub.Recommend(req, timeout=20)

    def guard_state(self, user: str) -> dict:
        """The user's guard state in memory: evidence, holder, candidate and its scores."""
        engine = self.handle.engine
        st = engine.users[user]
        g = st.guard
        assert g is not None
        scores = None
        if g.candidate is not None:
            scores = engine.ranker.scores([np.asarray(st.history)], edit=g.candidate)  # [1, I]
        return {
            "diffs": None if g.clicks is None else list(g.clicks.diffs),
            "window": None if g.clicks is None else g.clicks.diffs.maxlen,
            "evidence": g.evidence,
            "held_by": g.held_by,
            "candidate_info": g.candidate_info,
            "candidate_payload": g.candidate_payload,
            "candidate_scores": scores,
            "active_edit": st.edit_info,
        }

    def stop(self) -> None:
        self.channel.close()
        self.bg.run(self.handle.stop(0))


def _view(status: pb.GetStatusResponse) -> tuple:
    u = status.user
    mean = "nan" if np.isnan(u.guard_mean_gain_diff) else u.guard_mean_gain_diff
    return (u.history_length, u.mode, u.HasField("edit"), u.note, u.guard_clicks, mean,
            u.held_by)  # fmt: skip


def _sql(state: Path, statement: str) -> list[tuple]:
    """One statement on the state file through a second connection (committed, closed;
    WAL: a running server's connection stays open and sees it)."""
    db = sqlite3.connect(state)
    try:
        with db:
            return db.execute(statement).fetchall()
    finally:
        db.close()


def _counter_rows(state: Path) -> dict[str, int]:
    return dict(_sql(state, "SELECT name, value FROM counters"))


@contextmanager
def _refusing_counter_writes(state: Path) -> Iterator[None]:
    """A real SQLite error at the last statement of an edit write's transaction (after
    the user's edit and guard rows were written in it): a trigger aborting any counter
    write."""
    _sql(state, "CREATE TRIGGER refuse BEFORE INSERT ON counters "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END")  # fmt: skip
    try:
        yield
    finally:
        _sql(state, "DROP TRIGGER refuse")


def _device_with_an_edit(bg, artifacts, cloud_port: int, state: Path, user: str) -> _Device:
    """A guarded device on ``state`` where ``user`` has two events, the request at the
    second applied (no evidence yet: the guard accepts), so the user's next click is
    scored against that edit. The device is stopped if this fails."""
    dev = _Device(bg, artifacts, cloud_port, state)
    try:
        dev.event(user, "i1", 1)
        assert dev.event(user, "i2", 2).outcome == pb.EDIT_OUTCOME_APPLIED
    except BaseException:
        dev.stop()
        raise
    return dev


def test_guard_evidence_and_held_candidate_survive_a_restart(
    bg, artifacts, cloud, tmp_path: Path
) -> None:
    state = tmp_path / "device-state.sqlite"
    dev = _device_with_an_edit(bg, artifacts, cloud.port, state, "g1")
    try:
        expected = []
        for t in range(3, 9):  # six clicks the served edit ranks worse than the base head
            items = dev.unseen("g1")
            d = click_gain(dev.probe_ranks("g1", items, False)) - click_gain(
                dev.probe_ranks("g1", items, True)
            )
            k = int(np.argmin(d))
            if d[k] >= 0:
                pytest.skip("the tiny edit ranks no unseen item worse than the base head")
            expected.append(float(d[k]))
            dev.event("g1", items[k], t)
        held = dev.stub.RequestEdit(pb.RequestEditRequest(user_id="g1", wait_for_edit=True))
        assert held.outcome == pb.EDIT_OUTCOME_HELD and held.mode == pb.SERVING_MODE_BASE
        dev.event("g1", dev.unseen("g1")[0], 9)  # scored in shadow against the candidate
        before = dev.guard_state("g1")
        status, rec = dev.status("g1"), dev.recommend("g1")
    finally:
        dev.stop()
    assert before["held_by"] == "device" and before["active_edit"] is None
    assert len(before["diffs"]) == GUARD.window and before["evidence"][0] == 7
    assert before["diffs"][:3] == pytest.approx(expected[-3:])  # the window's oldest first
    assert status.user.guard_clicks == 7 and status.user.held_by == "device"
    counts = (status.guard_accepted, status.guard_rejected, status.fleet_held)
    assert counts == (1, 1, 0)  # the first edit accepted (no evidence), the second held

    dev = _Device(bg, artifacts, cloud.port, state)
    try:
        assert _view(dev.status("g1")) == _view(status)  # reloaded from the state file
        assert dev.counts() == counts  # the device-wide counters too
        after = dev.guard_state("g1")
        assert after.pop("candidate_scores").equal(before.pop("candidate_scores"))
        assert after == before  # evidence to the bit, holder, candidate payload and info
        again = dev.recommend("g1")
        assert again.mode == pb.SERVING_MODE_BASE and not again.HasField("edit")
        assert [(i.item_id, i.score) for i in again.items] == [
            (i.item_id, i.score) for i in rec.items
        ]
        assert list(again.probe_ranks) == list(rec.probe_ranks)
        # the next edit is judged on the restored evidence: held again (forgotten
        # evidence, fewer than min_evidence clicks, would have applied it)
        res = dev.stub.RequestEdit(pb.RequestEditRequest(user_id="g1", wait_for_edit=True))
        assert res.outcome == pb.EDIT_OUTCOME_HELD
        assert dev.counts() == (1, 2, 0)  # counted on from the stored counters
        dev.event("g1", dev.unseen("g1")[0], 10)  # still scored against a candidate
        assert dev.status("g1").user.guard_clicks == 8
        assert dev.handle.engine.state.stats()["guards_written"] >= 2
    finally:
        dev.stop()


def test_a_state_file_written_before_the_guard_state_loads_with_empty_evidence(
    bg, artifacts, cloud, tmp_path: Path
) -> None:
    state = tmp_path / "v1.sqlite"
    dev = _device_with_an_edit(bg, artifacts, cloud.port, state, "old")  # stored with the user
    try:
        dev.event("old", dev.unseen("old")[0], 3)  # a click scored: evidence stored
        top = dev.recommend("old")
    finally:
        dev.stop()
    with sqlite3.connect(state) as db:  # what a schema-1 device wrote: no guard table
        db.execute("DROP TABLE guard")
        db.execute("DROP TABLE counters")
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    dev = _Device(bg, artifacts, cloud.port, state)
    try:
        assert dev.counts() == (0, 0, 0)
        user = dev.status("old").user
        assert user.history_length == 3 and user.mode == pb.SERVING_MODE_EDITED
        assert user.guard_clicks == 0 and user.held_by == ""  # empty evidence
        assert [i.item_id for i in dev.recommend("old").items] == [i.item_id for i in top.items]
        dev.event("old", dev.unseen("old")[0], 4)
        assert dev.status("old").user.guard_clicks == 1
    finally:
        dev.stop()
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)
        assert db.execute("SELECT count(*) FROM guard").fetchone() == (1,)


def test_a_click_that_cannot_be_stored_adds_no_evidence(
    bg, artifacts, cloud, tmp_path: Path, monkeypatch
) -> None:
    from device_ranker.service.state import StateWriteError

    dev = _device_with_an_edit(bg, artifacts, cloud.port, tmp_path / "s.sqlite", "w")
    try:
        dev.event("w", dev.unseen("w")[0], 3)  # scored: evidence 1 click
        before = dev.guard_state("w")

        def refuse(*args, **kwargs):
            raise StateWriteError("disk full")

        monkeypatch.setattr(dev.handle.engine.state, "record_event", refuse)
        with pytest.raises(grpc.RpcError) as err:
            dev.event("w", dev.unseen("w")[0], 4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        after = dev.guard_state("w")
        assert after.pop("candidate_scores") is before.pop("candidate_scores") is None
        assert after == before and dev.status("w").user.guard_clicks == 1
    finally:
        dev.stop()


def test_a_candidate_the_fleet_guard_holds_survives_a_restart(bg, artifacts, tmp_path) -> None:
    """A device without its own guard: the cloud's proof guard holds the first edit (no
    evidence anywhere yet); after a restart the user is still served the base head with
    the same candidate held by the fleet."""
    fleet = FleetGuardConfig(mode="proof", min_evidence=3)
    cloud = bg.run(start_cloud(cloud_config(artifacts, fleet_guard=fleet)))
    state = tmp_path / "s.sqlite"
    try:
        dev = _Device(bg, artifacts, cloud.port, state, guard=False, guard_settings=GUARD)
        try:
            dev.event("f1", "i1", 1)
            held = dev.event("f1", "i2", 2)
            assert held.outcome == pb.EDIT_OUTCOME_HELD and held.mode == pb.SERVING_MODE_BASE
            before, status, rec = dev.guard_state("f1"), dev.status("f1"), dev.recommend("f1")
        finally:
            dev.stop()
        assert before["held_by"] == "fleet" and before["diffs"] is None  # no clicks scored
        dev = _Device(bg, artifacts, cloud.port, state, guard=False, guard_settings=GUARD)
        try:
            assert _view(dev.status("f1")) == _view(status)
            after = dev.guard_state("f1")
            assert after.pop("candidate_scores").equal(before.pop("candidate_scores"))
            assert after == before
            again = dev.recommend("f1")
            assert again.mode == pb.SERVING_MODE_BASE and list(again.items) == list(rec.items)
        finally:
            dev.stop()
    finally:
        bg.run(cloud.stop(0))


def test_guard_counters_survive_a_restart_in_status_and_metrics(bg, artifacts, tmp_path) -> None:
    """A guarded device whose cloud's proof guard holds every edit (no evidence yet):
    each request is accepted by the device's test and held by the fleet; a new server on
    the state file reports the same counters (GetStatus, the ``guarded`` metric) and
    counts on from them."""
    fleet = FleetGuardConfig(mode="proof", min_evidence=3)
    cloud = bg.run(start_cloud(cloud_config(artifacts, fleet_guard=fleet)))
    state = tmp_path / "s.sqlite"
    try:
        dev = _Device(bg, artifacts, cloud.port, state)
        try:
            dev.event("c1", "i1", 1)
            assert dev.event("c1", "i2", 2).outcome == pb.EDIT_OUTCOME_HELD
            assert dev.request_edit("c1").outcome == pb.EDIT_OUTCOME_HELD
            before, metric = dev.counts(), dev.edits_metric()
        finally:
            dev.stop()
        assert before == (2, 0, 2) and metric["guarded"] == 2
        assert _counter_rows(state) == {"guard_accepted": 2, "fleet_held": 2}
        dev = _Device(bg, artifacts, cloud.port, state)
        try:
            assert dev.counts() == before
            restored = dev.edits_metric()
            assert restored["guarded"] == 2 and restored["requested"] == 0  # a new process
            assert dev.request_edit("c1").outcome == pb.EDIT_OUTCOME_HELD
            assert dev.counts() == (3, 0, 3) and dev.edits_metric()["guarded"] == 3
        finally:
            dev.stop()
        assert _counter_rows(state) == {"guard_accepted": 3, "fleet_held": 3}
    finally:
        bg.run(cloud.stop(0))


def test_an_applied_edit_that_cannot_be_stored_is_not_counted(
    bg, artifacts, cloud, tmp_path: Path
) -> None:
    state = tmp_path / "s.sqlite"
    dev = _device_with_an_edit(bg, artifacts, cloud.port, state, "w")
    try:
        before, user, guard = dev.counts(), dev.status("w").user, dev.guard_state("w")
        assert before == (1, 0, 0) and user.mode == pb.SERVING_MODE_EDITED
        stored = _sql(state, "SELECT edit_id, edit_payload FROM users WHERE user_id='w'")
        with _refusing_counter_writes(state):
            res = dev.request_edit("w")
            assert res.outcome == pb.EDIT_OUTCOME_FAILED
            assert res.mode == pb.SERVING_MODE_FALLBACK_LAST_EDIT and res.edit == user.edit
            assert dev.counts() == before and dev.guard_state("w") == guard
            after = dev.status("w").user
            assert after.edit == user.edit and "could not store edit" in after.note
            metric = dev.edits_metric()
            assert (metric["applied"], metric["failed"]) == (1, 1)
        # nothing of the refused transaction is in the file: the edit, nor the counts
        assert _sql(state, "SELECT edit_id, edit_payload FROM users WHERE user_id='w'") == stored
        assert _counter_rows(state) == {"guard_accepted": 1}
        # the file writable again: the next edit is stored and counted
        assert dev.request_edit("w").outcome == pb.EDIT_OUTCOME_APPLIED
        assert dev.counts() == (2, 0, 0) and _counter_rows(state) == {"guard_accepted": 2}
    finally:
        dev.stop()
    dev = _Device(bg, artifacts, cloud.port, state)
    try:
        assert dev.counts() == (2, 0, 0)
    finally:
        dev.stop()


def test_a_held_edit_that_cannot_be_stored_is_not_counted(bg, artifacts, tmp_path) -> None:
    """The fleet holds every edit: a second held edit whose write fails leaves the
    first one held (same candidate), the counters and the file as they were."""
    fleet = FleetGuardConfig(mode="proof", min_evidence=3)
    cloud = bg.run(start_cloud(cloud_config(artifacts, fleet_guard=fleet)))
    state = tmp_path / "s.sqlite"
    try:
        dev = _Device(bg, artifacts, cloud.port, state)
        try:
            dev.event("h", "i1", 1)
            assert dev.event("h", "i2", 2).outcome == pb.EDIT_OUTCOME_HELD
            before, guard = dev.counts(), dev.guard_state("h")
            stored = _sql(state, "SELECT candidate_info, candidate_payload FROM guard")
            with _refusing_counter_writes(state):
                res = dev.request_edit("h")
                assert res.outcome == pb.EDIT_OUTCOME_FAILED
                assert res.mode == pb.SERVING_MODE_FALLBACK_BASE and not res.HasField("edit")
                assert dev.counts() == before == (1, 0, 1)
                after = dev.guard_state("h")
                assert after.pop("candidate_scores").equal(guard.pop("candidate_scores"))
                assert after == guard  # the first edit still held, by the fleet
            assert _sql(state, "SELECT candidate_info, candidate_payload FROM guard") == stored
            assert _counter_rows(state) == {"guard_accepted": 1, "fleet_held": 1}
        finally:
            dev.stop()
    finally:
        bg.run(cloud.stop(0))


def test_a_state_file_written_before_the_counters_starts_them_at_zero(
    bg, artifacts, cloud, tmp_path: Path
) -> None:
    state = tmp_path / "old.sqlite"
    dev = _device_with_an_edit(bg, artifacts, cloud.port, state, "o")
    try:
        top = dev.recommend("o")
    finally:
        dev.stop()
    _sql(state, "DROP TABLE counters")  # what a schema-2 device wrote before them
    dev = _Device(bg, artifacts, cloud.port, state)
    try:
        assert dev.counts() == (0, 0, 0) and dev.edits_metric()["guarded"] == 0
        user = dev.status("o").user
        assert user.history_length == 2 and user.mode == pb.SERVING_MODE_EDITED
        assert [i.item_id for i in dev.recommend("o").items] == [i.item_id for i in top.items]
        assert dev.request_edit("o").outcome == pb.EDIT_OUTCOME_APPLIED
        assert dev.counts() == (1, 0, 0)
    finally:
        dev.stop()
    assert _sql(state, "SELECT value FROM meta WHERE key='schema'") == [("2",)]
    assert _counter_rows(state) == {"guard_accepted": 1}
