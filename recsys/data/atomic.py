"""Files and folders replaced atomically: a reader (or a crash) sees the old version or
the new one, never a half-written file.

Both write beside the destination (same file system) and finish with ``os.replace``.

Example::

    atomic_write(Path("out/codes.npy"), lambda fh: np.save(fh, codes))
    replace_dir(staging, Path("datasets/ml-100k"))     # staging: a finished folder
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(dest: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``dest`` with ``write(fh)`` through a temporary file in the same folder
    (flushed and fsynced), then rename it over ``dest``; the folder is created if needed
    and the file is world-readable (0644)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished directory ``new`` to ``dest`` (same file system), replacing any
    existing ``dest`` by renames only: a reader sees the old or the new folder, never a
    half-written one."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


__all__ = ["atomic_write", "replace_dir"]
