"""A refinement that fails half-way (exception in the update function, error after the new
rows were flushed, or a writer process killed while holding the lock) leaves the last
committed version intact and readable, and the next refinement proceeds normally."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from codebook.store import PrototypeState, PrototypeStore, VersionContent
from codebook.store.repository import PrototypeRepository

ROOT = Path(__file__).resolve().parents[3]


def add_one(state: PrototypeState) -> VersionContent:
    return VersionContent(code=state.code + 1, tensors={"w": state.code.reshape(1, -1)})


@pytest.fixture
def refined(store: PrototypeStore) -> int:
    """A prototype at version 3 (code == 2)."""
    p = store.create_prototype("p", VersionContent(code=np.zeros(4, np.float32)))
    store.refine_prototype(p.prototype_id, add_one)
    store.refine_prototype(p.prototype_id, add_one)
    return p.prototype_id


def assert_intact_at_3(store: PrototypeStore, pid: int) -> None:
    latest = store.get_prototype(pid)
    assert latest.version == 3
    np.testing.assert_array_equal(latest.code, np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(latest.tensors["w"], np.full((1, 4), 1.0, np.float32))
    assert store.count_versions(pid) == 3
    assert store.changes_since(pid, 3) == []


def test_exception_in_update_function_rolls_back(store: PrototypeStore, refined: int) -> None:
    def broken(state: PrototypeState) -> VersionContent:
        raise RuntimeError("adaptor crashed")

    with pytest.raises(RuntimeError, match="adaptor crashed"):
        store.refine_prototype(refined, broken)
    assert_intact_at_3(store, refined)
    assert store.refine_prototype(refined, add_one).version == 4


def test_error_after_flush_rolls_back_everything(store: PrototypeStore, refined: int) -> None:
    with pytest.raises(RuntimeError, match="power cut"), store.transaction(write=True) as session:
        repo = PrototypeRepository(session)
        proto = repo.get(refined, lock=True)
        latest = repo.version(refined, proto.current_version)
        repo.append(proto, latest, VersionContent(code=np.full(4, 99.0, np.float32)))
        assert repo.count_versions(refined) == 4  # flushed inside the transaction
        raise RuntimeError("power cut")
    assert_intact_at_3(store, refined)
    assert store.refine_prototype(refined, add_one).version == 4


# The child takes the write lock, writes version 4 (flushed, not committed), says so, and
# is killed with SIGKILL: no rollback, no cleanup, the connection just disappears.
_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    from codebook.store import PrototypeStore, VersionContent
    from codebook.store.repository import PrototypeRepository

    store = PrototypeStore.open(sys.argv[1])
    pid = int(sys.argv[2])
    with store.transaction(write=True) as session:
        repo = PrototypeRepository(session)
        proto = repo.get(pid, lock=True)
        latest = repo.version(pid, proto.current_version)
        repo.append(proto, latest, VersionContent(code=np.full(4, -1.0, np.float32)))
        print("LOCKED", flush=True)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_writer_killed_mid_transaction_leaves_last_version(
    store: PrototypeStore, refined: int, db_url: str
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, db_url, str(refined)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line.strip() == "LOCKED", child.stderr.read() if child.stderr else ""
        # blocks on the child's lock until the child dies, then refines from version 3
        after = store.refine_prototype(refined, add_one)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -9  # killed, not exited
    assert after.version == 4
    np.testing.assert_array_equal(after.code, np.full(4, 3.0, np.float32))
    assert [s.version for s in store.changes_since(refined, 2)] == [3, 4]
    assert store.get_prototype(refined, 3).code[0] == 2.0
