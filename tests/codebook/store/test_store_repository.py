"""Every use case of the prototype store, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC

import numpy as np
import pytest
from sqlalchemy import func, select

from codebook.store import (
    PrototypeState,
    PrototypeStore,
    VersionContent,
    VersionRef,
    make_sessionmaker,
)
from codebook.store.models import Prototype, PrototypeVersion
from codebook.store.repository import PrototypeRepository
from recsys.errors import NotFoundError, ValidationError


def content(value: float = 0.0, dim: int = 4, **kwargs) -> VersionContent:
    return VersionContent(code=np.full(dim, value, np.float32), **kwargs)


def add_one(state: PrototypeState) -> VersionContent:
    return VersionContent(code=state.code + 1)


# ---- prototypes -----------------------------------------------------------------------------
def test_create_prototype_stores_version_one(store: PrototypeStore) -> None:
    tensors = {"layer0.U": np.ones((3, 2), np.float16), "layer0.bias": np.arange(3.0)}
    p = store.create_prototype(
        "sports", content(0.5, tensors=tensors, member_count=7, residual_norm_mean=0.25)
    )
    assert (p.name, p.version, p.reason, p.parent) == ("sports", 1, "init", None)
    assert p.member_count == 7 and p.residual_norm_mean == 0.25 and p.residual_norm_max == 0.0
    assert p.created_at.tzinfo is not None
    got = store.get_prototype(p.prototype_id)
    np.testing.assert_array_equal(got.code, np.full(4, 0.5, np.float32))
    assert sorted(got.tensors) == ["layer0.U", "layer0.bias"]
    assert got.tensors["layer0.U"].dtype == np.float16
    np.testing.assert_array_equal(got.tensors["layer0.bias"], np.arange(3.0))
    assert got.created_at == p.created_at


def test_create_prototype_rejects_bad_input(store: PrototypeStore) -> None:
    store.create_prototype("a", content())
    with pytest.raises(ValidationError, match="already exists"):
        store.create_prototype("a", content())
    with pytest.raises(ValidationError, match="non-empty"):
        store.create_prototype("  ", content())
    with pytest.raises(ValidationError, match="NaN or Inf"):
        store.create_prototype("nan", VersionContent(code=np.array([1.0, np.nan])))
    with pytest.raises(ValidationError, match="NaN or Inf"):
        store.create_prototype("inf", content(tensors={"w": np.array([np.inf])}))
    with pytest.raises(ValidationError, match="reason"):
        store.create_prototype("r", content(), reason="refine")
    with pytest.raises(ValidationError, match="member_count"):
        store.create_prototype("m", content(member_count=-1))
    assert [p.name for p in store.list_prototypes()] == ["a"]  # nothing half-written


def test_get_prototype_latest_or_given_version_and_not_found(store: PrototypeStore) -> None:
    p = store.create_prototype("p", content(0.0))
    for _ in range(3):
        store.refine_prototype(p.prototype_id, add_one)
    assert store.get_prototype(p.prototype_id).version == 4
    assert store.get_prototype(p.prototype_id).code[0] == 3.0
    assert store.get_prototype(p.prototype_id, version=2).code[0] == 1.0
    with pytest.raises(NotFoundError, match="no version 9"):
        store.get_prototype(p.prototype_id, version=9)
    with pytest.raises(NotFoundError, match="no prototype with id 999"):
        store.get_prototype(999)
    with pytest.raises(NotFoundError):
        store.refine_prototype(999, add_one)


def test_list_and_find_prototypes(store: PrototypeStore) -> None:
    assert store.list_prototypes() == []
    a = store.create_prototype("a", content())
    b = store.create_prototype("b", content())
    store.refine_prototype(b.prototype_id, add_one)
    listed = store.list_prototypes()
    assert [(i.id, i.name, i.current_version) for i in listed] == [
        (a.prototype_id, "a", 1),
        (b.prototype_id, "b", 2),
    ]
    assert store.find_prototype("b").current_version == 2
    assert store.find_prototype("nope") is None


def test_refine_appends_a_version_and_inherits_what_the_update_leaves_out(
    store: PrototypeStore,
) -> None:
    tensors = {"w": np.eye(2, dtype=np.float32)}
    p = store.create_prototype(
        "p", content(1.0, tensors=tensors, member_count=3, residual_norm_max=2.0)
    )
    seen: list[int] = []

    def update(state: PrototypeState) -> VersionContent:
        seen.append(state.version)
        return VersionContent(code=state.code * 2, member_count=state.member_count + 1)

    r = store.refine_prototype(p.prototype_id, update)
    assert seen == [1]
    assert (r.version, r.reason, r.parent) == (2, "refine", VersionRef(p.prototype_id, 1))
    assert r.member_count == 4 and r.residual_norm_max == 2.0  # inherited
    np.testing.assert_array_equal(r.code, np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(r.tensors["w"], np.eye(2))  # inherited
    r3 = store.refine_prototype(
        p.prototype_id, lambda s: VersionContent(code=s.code, tensors={"v": np.zeros(1)})
    )
    assert sorted(r3.tensors) == ["v"]  # replaced
    assert store.get_prototype(p.prototype_id, 1).code[0] == 1.0  # old versions unchanged


def test_refine_rejects_a_code_of_another_shape(store: PrototypeStore) -> None:
    p = store.create_prototype("p", content(dim=4))
    with pytest.raises(ValidationError, match=r"shape \[5\]"):
        store.refine_prototype(p.prototype_id, lambda s: VersionContent(code=np.zeros(5)))
    with pytest.raises(ValidationError, match="VersionContent"):
        store.refine_prototype(p.prototype_id, lambda s: s.code)  # type: ignore[arg-type,return-value]
    assert store.count_versions(p.prototype_id) == 1


def test_split_and_spawn_record_their_parent(store: PrototypeStore) -> None:
    base = store.create_prototype("base", content(1.0))
    store.refine_prototype(base.prototype_id, add_one)
    child = store.create_prototype(
        "base/split-1", content(5.0), reason="split", parent=VersionRef(base.prototype_id, 2)
    )
    assert (child.version, child.reason, child.parent) == (
        1,
        "split",
        VersionRef(base.prototype_id, 2),
    )
    spawned = store.refine_prototype(child.prototype_id, add_one, reason="spawn")
    assert spawned.reason == "spawn"
    with pytest.raises(NotFoundError):
        store.create_prototype("x", content(), reason="spawn", parent=VersionRef(12345, 1))


def test_changes_since_version(store: PrototypeStore) -> None:
    p = store.create_prototype("p", content(0.0))
    for _ in range(4):
        store.refine_prototype(p.prototype_id, add_one)
    assert [s.version for s in store.changes_since(p.prototype_id, 0)] == [1, 2, 3, 4, 5]
    since = store.changes_since(p.prototype_id, 2)
    assert [s.version for s in since] == [3, 4, 5]
    assert [float(s.code[0]) for s in since] == [2.0, 3.0, 4.0]
    assert store.changes_since(p.prototype_id, 5) == []
    assert store.changes_since(p.prototype_id, 99) == []
    with pytest.raises(NotFoundError):
        store.changes_since(424242, 0)
    with pytest.raises(ValidationError):
        store.changes_since(p.prototype_id, -1)


# ---- devices and the edit log ---------------------------------------------------------------
def test_assign_device_upserts_and_tracks_seen_version(store: PrototypeStore) -> None:
    a = store.create_prototype("a", content())
    b = store.create_prototype("b", content())
    first = store.assign_device("dev-1", a.prototype_id, seen_version=1)
    assert (first.prototype_id, first.seen_version) == (a.prototype_id, 1)
    assert first.assigned_at.tzinfo == UTC
    moved = store.assign_device("dev-1", b.prototype_id)
    assert (moved.prototype_id, moved.seen_version) == (b.prototype_id, None)
    assert store.get_device_assignment("dev-1") == moved

    for _ in range(2):
        store.refine_prototype(b.prototype_id, add_one)
    assert [s.version for s in store.updates_for_device("dev-1")] == [1, 2, 3]
    store.mark_device_seen("dev-1", 2)
    assert [s.version for s in store.updates_for_device("dev-1")] == [3]

    with pytest.raises(NotFoundError):
        store.assign_device("dev-2", 999)
    with pytest.raises(NotFoundError):
        store.get_device_assignment("dev-unknown")
    with pytest.raises(ValidationError, match="outside"):
        store.assign_device("dev-1", a.prototype_id, seen_version=5)
    with pytest.raises(ValidationError, match="outside"):
        store.mark_device_seen("dev-1", 0)


def test_log_edit_and_read_back(store: PrototypeStore) -> None:
    p = store.create_prototype("p", content())
    for i in range(3):
        store.log_edit(
            device_id="dev-1",
            tokens=f"<a_{i}><b_2>",
            prototype_id=p.prototype_id,
            prototype_version=1,
            edit_norm=0.5 + i,
            payload_bytes=1024,
            latency_ms=12.5,
        )
    store.log_edit(
        device_id="dev-2",
        tokens="",
        prototype_id=None,
        prototype_version=None,
        edit_norm=0.0,
        payload_bytes=0,
        latency_ms=1.0,
    )
    edits = store.edits_for_device("dev-1")
    assert [e.tokens for e in edits] == ["<a_2><b_2>", "<a_1><b_2>", "<a_0><b_2>"]  # newest first
    assert edits[0].edit_norm == 2.5 and edits[0].payload_bytes == 1024
    assert len(store.edits_for_device("dev-1", limit=2)) == 2
    with pytest.raises(NotFoundError):
        store.log_edit(
            device_id="d",
            tokens="",
            prototype_id=999,
            prototype_version=1,
            edit_norm=0.0,
            payload_bytes=0,
            latency_ms=0.0,
        )
    with pytest.raises(ValidationError, match="edit_norm"):
        store.log_edit(
            device_id="d",
            tokens="",
            prototype_id=None,
            prototype_version=None,
            edit_norm=float("nan"),
            payload_bytes=0,
            latency_ms=0.0,
        )


# ---- experiments ----------------------------------------------------------------------------
def test_create_experiment_and_arms(store: PrototypeStore) -> None:
    config = {"arms": {"control": 0.5, "treatment": 0.5}, "metric": "ndcg@10"}
    exp = store.create_experiment("budget", "salt-1", config)
    assert (exp.name, exp.salt, exp.config) == ("budget", "salt-1", config)
    assert store.get_experiment("budget") == exp
    with pytest.raises(ValidationError, match="already exists"):
        store.create_experiment("budget", "salt-1", config)
    assert store.create_experiment("budget", "salt-1", config, exist_ok=True) == exp
    with pytest.raises(ValidationError, match="different salt or config"):
        store.create_experiment("budget", "salt-2", config, exist_ok=True)
    with pytest.raises(NotFoundError):
        store.get_experiment("nope")

    first = store.get_or_create_arm(exp.id, "u1", "treatment")
    assert (first.arm, first.created) == ("treatment", True)
    again = store.get_or_create_arm(exp.id, "u1", "control")  # persisted arm wins
    assert (again.arm, again.created, again.assigned_at) == ("treatment", False, first.assigned_at)
    store.get_or_create_arm(exp.id, "u2", "control")
    store.get_or_create_arm(exp.id, "u3", "control")
    assert store.arm_counts(exp.id) == {"control": 2, "treatment": 1}
    with pytest.raises(NotFoundError):
        store.get_or_create_arm(999, "u1", "control")


# ---- repositories flush, the service commits ------------------------------------------------
def test_repository_flushes_but_never_commits(store: PrototypeStore) -> None:
    sessions = make_sessionmaker(store.engine)
    with sessions() as session:
        session.begin()
        row = PrototypeRepository(session).create("temp", content())
        assert row.id is not None and row.prototype_id is not None  # flushed: ids exist
    # closed without a commit: nothing was written
    with sessions() as session, session.begin():
        assert session.scalar(select(func.count()).select_from(Prototype)) == 0
        assert session.scalar(select(func.count()).select_from(PrototypeVersion)) == 0
