"""Arrays as database blobs: ``(bytes, dtype, shape)`` triples, validated on load.

An array is stored as its raw C-order bytes in little-endian byte order, the numpy dtype
string (``"<f4"``, ``"<f2"``, ``"|i1"``, ...) and the shape as a list of ints. Loading checks
that the dtype is a plain numeric/bool dtype and that ``len(data) == itemsize * prod(shape)``,
so a truncated or mislabelled blob raises :class:`recsys.errors.ValidationError` instead of
becoming a silently wrong tensor. No pickle is involved anywhere.

Example::

    blob = encode_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    blob.dtype, blob.shape            # ('<f4', (2, 3))
    decode_array(blob.data, blob.dtype, blob.shape)   # float32 [2, 3]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

# numpy dtype kinds a blob may hold: bool, signed/unsigned int, float, complex
_ALLOWED_KINDS = frozenset("biufc")


@dataclass(frozen=True)
class ArrayBlob:
    """One array ready for the database: raw bytes, dtype string, shape."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]


def _to_numpy(array: Any) -> np.ndarray:
    """numpy view of ``array`` (numpy array, torch tensor, or anything ``np.asarray`` takes)."""
    if isinstance(array, np.ndarray):
        return array
    if type(array).__module__.startswith("torch") and hasattr(array, "detach"):
        tensor = array.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            raise ValidationError(
                "bfloat16 tensors have no numpy dtype; convert with .float() or .half() "
                "before storing"
            )
        return tensor.numpy()
    return np.asarray(array)


def encode_array(array: Any) -> ArrayBlob:
    """``array`` (numpy or torch, any shape) -> :class:`ArrayBlob` (little-endian, C order)."""
    arr = _to_numpy(array)
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise ValidationError(
            f"cannot store an array of dtype {arr.dtype}: only bool, integer, float and "
            "complex arrays can be stored"
        )
    # little-endian on every machine ("|" dtypes such as int8 and bool have no byte order)
    arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")  # keeps 0-d shape
    return ArrayBlob(
        data=arr.tobytes(), dtype=arr.dtype.str, shape=tuple(int(s) for s in arr.shape)
    )


def decode_array(data: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`encode_array`: a new writable numpy array of ``dtype`` and ``shape``.

    Raises :class:`ValidationError` when the dtype is unknown or not numeric, the shape has
    negative or non-integer entries, or the byte count does not match ``dtype`` x ``shape``.
    """
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise ValidationError(f"stored blob has an unknown dtype {dtype!r}: {exc}") from exc
    if np_dtype.kind not in _ALLOWED_KINDS or np_dtype.fields is not None:
        raise ValidationError(f"stored blob has a non-numeric dtype {dtype!r}")
    dims = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValidationError(f"stored blob has an invalid shape {list(dims)!r}")
    expected = np_dtype.itemsize * math.prod(dims)
    if len(data) != expected:
        raise ValidationError(
            f"stored blob is corrupt: {len(data)} bytes, but dtype {dtype} x shape "
            f"{list(dims)} needs {expected} bytes; the row was truncated or its "
            "dtype/shape columns were changed"
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(dims).copy()
