"""Atomic writes: a failed write leaves the old file and no temporary; folders swap whole."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from recsys.data.atomic import atomic_write, replace_dir


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "x.bin"
    atomic_write(dest, lambda fh: fh.write(b"one"))
    assert dest.read_bytes() == b"one" and stat.S_IMODE(dest.stat().st_mode) == 0o644

    def fails(fh) -> None:
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(dest, fails)
    assert dest.read_bytes() == b"one"
    assert [p.name for p in dest.parent.iterdir()] == ["x.bin"]  # no temporary left


def test_replace_dir_swaps_the_whole_folder(tmp_path: Path) -> None:
    dest = tmp_path / "ds"
    for version in ("old", "new"):
        staging = tmp_path / f".staging-{version}"
        staging.mkdir()
        (staging / f"{version}.txt").write_text(version)
        replace_dir(staging, dest)
        assert [p.name for p in dest.iterdir()] == [f"{version}.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .ds.old, no staging
