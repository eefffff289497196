"""Small file helpers for codebook artefacts: atomic writes (:func:`recsys.data.atomic.atomic_write`,
re-exported) and JSON reads that name the file and check the format version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from recsys.data.atomic import atomic_write
from recsys.errors import DataFormatError


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


def read_json(path: Path, hint: str, *, version: int | None = None) -> dict[str, Any]:
    """Read a JSON object; a :class:`DataFormatError` names the file and says ``hint``.

    With ``version``, the object's ``format_version`` must equal it.
    """
    if not path.is_file():
        raise DataFormatError(path, None, f"missing; {hint}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON ({exc.msg}); {hint}") from None
    if not isinstance(payload, dict):
        raise DataFormatError(path, None, f"expected a JSON object; {hint}")
    if version is not None and payload.get("format_version") != version:
        raise DataFormatError(
            path, None, f"format_version {payload.get('format_version')} is not {version}"
        )
    return payload


__all__ = ["atomic_write", "read_json", "write_json"]
