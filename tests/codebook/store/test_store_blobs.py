"""Arrays as (bytes, dtype, shape) blobs: round trips and clear errors on corrupt rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import update

from codebook.store import PrototypeStore, VersionContent, decode_array, encode_array
from codebook.store.models import PrototypeTensor, PrototypeVersion
from recsys.errors import ValidationError


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(6, dtype=">f8").reshape(2, 3),  # big-endian input is stored little-endian
        np.zeros((0, 5), dtype=np.int8),
        np.array(True),  # 0-d
        np.ones((4, 3), dtype=np.float16).T,  # non-contiguous
        np.array([1 + 2j], dtype=np.complex64),
        np.array([-(2**40)], dtype=np.int64),
    ],
    ids=["f32", "f64-big-endian", "empty-i8", "0d-bool", "f16-transposed", "c64", "i64"],
)
def test_numpy_round_trip(array: np.ndarray) -> None:
    blob = encode_array(array)
    assert blob.shape == array.shape
    assert blob.dtype[0] in "<|"
    out = decode_array(blob.data, blob.dtype, blob.shape)
    assert out.shape == array.shape
    assert out.dtype == array.dtype.newbyteorder("<")
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # a writable copy, not a view of the bytes


def test_torch_round_trip() -> None:
    t = torch.randn(5, 3)
    blob = encode_array(t)
    assert (blob.dtype, blob.shape) == ("<f4", (5, 3))
    assert torch.equal(torch.from_numpy(decode_array(blob.data, blob.dtype, blob.shape)), t)


def test_bfloat16_is_refused_with_advice() -> None:
    with pytest.raises(ValidationError, match=r"\.float\(\)"):
        encode_array(torch.zeros(2, dtype=torch.bfloat16))


def test_object_arrays_are_refused() -> None:
    with pytest.raises(ValidationError, match="dtype object"):
        encode_array(np.array([{"a": 1}], dtype=object))


@pytest.mark.parametrize(
    ("data", "dtype", "shape", "message"),
    [
        (b"\x00" * 15, "<f4", [2, 2], "corrupt: 15 bytes.*needs 16 bytes"),
        (b"\x00" * 16, "<f8", [2, 2], "corrupt: 16 bytes.*needs 32 bytes"),
        (b"\x00" * 16, "nonsense", [4], "unknown dtype"),
        (b"\x00" * 16, "|O", [2], "non-numeric dtype"),
        (b"\x00" * 16, "<f4", [-4], "invalid shape"),
        (b"\x00" * 16, "<f4", [2.0, 2], "invalid shape"),
    ],
)
def test_corrupt_blob_raises_clear_error(
    data: bytes, dtype: str, shape: list, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        decode_array(data, dtype, shape)


def test_corrupt_rows_in_the_database_are_reported(store: PrototypeStore) -> None:
    p = store.create_prototype(
        "p",
        VersionContent(code=np.ones(8, np.float32), tensors={"w": np.ones((2, 3), np.float32)}),
    )
    with store.engine.begin() as conn:  # simulate a truncated write of the code blob
        conn.execute(
            update(PrototypeVersion)
            .where(PrototypeVersion.prototype_id == p.prototype_id)
            .values(code_data=b"\x00" * 31)
        )
    with pytest.raises(ValidationError, match=r"31 bytes.*needs 32 bytes"):
        store.get_prototype(p.prototype_id)

    q = store.create_prototype("q", VersionContent(code=np.ones(2), tensors={"w": np.ones(3)}))
    with store.engine.begin() as conn:  # a tensor whose shape column was changed
        conn.execute(update(PrototypeTensor).where(PrototypeTensor.name == "w").values(shape=[4]))
    with pytest.raises(ValidationError, match="corrupt"):
        store.get_prototype(q.prototype_id)
