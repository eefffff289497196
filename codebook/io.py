"""Small file helpers for codebook artefacts: atomic writes and JSON reads that name the file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from recsys.errors import DataFormatError


def atomic_write(dest: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``dest`` through a temporary file in the same folder, then rename it."""
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(dest: Path, payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` as indented JSON."""
    data = (json.dumps(payload, indent=2, default=_jsonable) + "\n").encode("utf-8")
    atomic_write(dest, lambda fh: fh.write(data))


def read_json(path: Path, hint: str) -> dict[str, Any]:
    """Read a JSON object; a :class:`DataFormatError` names the file and says ``hint``."""
    if not path.is_file():
        raise DataFormatError(path, None, f"missing; {hint}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON ({exc.msg}); {hint}") from None
    if not isinstance(payload, dict):
        raise DataFormatError(path, None, f"expected a JSON object; {hint}")
    return payload
