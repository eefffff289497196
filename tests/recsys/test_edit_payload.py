"""The edit payload codec: round trips (fp32 exact, fp16 / int8 within their error bounds),
sizes, and every kind of malformed payload raising ValidationError."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.edit_payload import (
    decode_payload,
    decode_values,
    dense_head_bytes,
    encode_payload,
    quantisation_error_bound,
)
from recsys.errors import ValidationError

SPEC = {"fc0": (128, 64), "fc1": (64, 128)}


def make_edit(rank: int = 8, seed: int = 0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in SPEC.items():
        out[f"{name}.u"] = torch.nn.functional.normalize(torch.randn(o, rank, generator=g), dim=0)
        out[f"{name}.s"] = torch.rand(rank, generator=g) * scale
        out[f"{name}.v"] = torch.nn.functional.normalize(torch.randn(i, rank, generator=g), dim=0)
        out[f"{name}.bias"] = torch.randn(o, generator=g) * 0.05
    return out


def recrc(body: bytes) -> bytes:
    """Replace the CRC trailer so a deliberately corrupted body reaches the parser."""
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def test_fp32_round_trip_is_exact_and_carries_the_prototype() -> None:
    edit = make_edit()
    data = encode_payload(edit, dtype="fp32", prototype=(7, 42))
    p = decode_payload(data, spec=SPEC, max_rank=8)
    assert (p.prototype_id, p.prototype_version, p.dtype, p.nbytes) == (7, 42, "fp32", len(data))
    assert p.tensors.keys() == edit.keys()
    for k in edit:
        assert torch.equal(p.tensors[k], edit[k])


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_quantised_round_trip_within_bound(dtype: str) -> None:
    edit = make_edit(seed=3)
    bound = quantisation_error_bound(edit, dtype)
    p = decode_payload(encode_payload(edit, dtype=dtype), spec=SPEC)
    assert p.prototype_id is None and p.prototype_version is None
    for k, t in edit.items():
        err = float((p.tensors[k] - t).abs().max())
        assert err <= bound[k], (k, err, bound[k])
        assert p.tensors[k].dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=1, max_size=40),
    dtype=st.sampled_from(["fp16", "int8", "fp32"]),
)
def test_round_trip_error_bound_property(values: list[float], dtype: str) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    edit = {"fc0.bias": t}
    back = decode_payload(encode_payload(edit, dtype=dtype)).tensors["fc0.bias"]
    assert float((back - t).abs().max()) <= quantisation_error_bound(edit, dtype)["fc0.bias"]


def test_default_edit_is_under_8_kb_and_far_below_the_dense_head() -> None:
    fp16 = len(encode_payload(make_edit(rank=8), dtype="fp16"))
    int8 = len(encode_payload(make_edit(rank=8), dtype="int8"))
    values = sum(t.numel() for t in make_edit(rank=8).values())
    assert values == 386 * 8 + 192
    assert 2 * values < fp16 < 8 * 1024
    assert values < int8 < fp16 / 1.8
    assert dense_head_bytes(SPEC) == 66_304  # the fp32 head a dense generator would send


def test_zero_tensor_int8_scale_is_safe() -> None:
    p = decode_payload(encode_payload({"fc0.bias": torch.zeros(128)}, dtype="int8"), spec=SPEC)
    assert torch.equal(p.tensors["fc0.bias"], torch.zeros(128))


@pytest.mark.parametrize("cut", [0, 3, 10, 25, 100, -1, -5])
def test_truncated_bytes_raise(cut: int) -> None:
    data = encode_payload(make_edit(rank=2), dtype="fp16")
    with pytest.raises(ValidationError):
        decode_payload(data[:cut])


def test_truncated_body_with_valid_crc_names_the_tensor() -> None:
    data = encode_payload(make_edit(rank=2), dtype="fp16")
    body = data[:-4][:-7]  # drop the end of the last tensor, fix the checksum
    with pytest.raises(ValidationError, match="truncated"):
        decode_payload(recrc(body))


def test_trailing_bytes_raise() -> None:
    body = encode_payload(make_edit(rank=2))[:-4] + b"\x00\x00"
    with pytest.raises(ValidationError, match="trailing"):
        decode_payload(recrc(body))


def test_corrupted_byte_fails_the_checksum() -> None:
    data = bytearray(encode_payload(make_edit(rank=2)))
    data[40] ^= 0xFF
    with pytest.raises(ValidationError, match="checksum"):
        decode_payload(bytes(data))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(0, b"XXXX", "magic"), (4, b"\x09", "format"), (5, b"\x07", "dtype")],
)
def test_bad_header_fields(offset: int, value: bytes, message: str) -> None:
    body = bytearray(encode_payload(make_edit(rank=2))[:-4])
    body[offset : offset + len(value)] = value
    with pytest.raises(ValidationError, match=message):
        decode_payload(recrc(bytes(body)))


def test_wrong_shapes_raise_against_the_spec() -> None:
    edit = make_edit(rank=4)
    edit["fc0.u"] = edit["fc0.u"][:100]  # [100, 4] instead of [128, 4]
    with pytest.raises(ValidationError, match=r"fc0\.u"):
        decode_payload(encode_payload(edit), spec=SPEC)
    bad_rank = make_edit(rank=4)
    bad_rank["fc1.s"] = torch.ones(3)
    with pytest.raises(ValidationError, match="fc1"):
        decode_payload(encode_payload(bad_rank), spec=SPEC)
    with pytest.raises(ValidationError, match="unknown head layer"):
        decode_payload(encode_payload({"fc9.bias": torch.zeros(4)}), spec=SPEC)
    partial = {k: v for k, v in make_edit(rank=2).items() if k != "fc0.v"}
    with pytest.raises(ValidationError, match="together"):
        decode_payload(encode_payload(partial), spec=SPEC)
    with pytest.raises(ValidationError, match="rank"):
        decode_payload(encode_payload(make_edit(rank=8)), spec=SPEC, max_rank=4)


def test_nan_is_rejected_on_both_sides() -> None:
    edit = make_edit(rank=2)
    edit["fc1.s"] = torch.tensor([0.1, float("nan")])
    with pytest.raises(ValidationError, match="NaN"):
        encode_payload(edit)
    # a NaN smuggled into the fp16 bytes (with a valid checksum) is caught on decode
    body = bytearray(encode_payload({"fc0.s": torch.tensor([1.0, 2.0])}, dtype="fp16")[:-4])
    body[-2:] = np.array([np.nan], dtype="<f2").tobytes()
    with pytest.raises(ValidationError, match="NaN"):
        decode_payload(recrc(bytes(body)))
    body = bytearray(encode_payload({"fc0.s": torch.tensor([1.0, 2.0])}, dtype="int8")[:-4])
    body[-6:-2] = struct.pack("<f", float("nan"))  # the int8 scale
    with pytest.raises(ValidationError, match="scale"):
        decode_payload(recrc(bytes(body)))


def test_bad_names_and_types() -> None:
    with pytest.raises(ValidationError, match="name"):
        encode_payload({"fc0.weight": torch.zeros(2)})
    with pytest.raises(ValidationError, match="dtype"):
        encode_payload(make_edit(rank=1), dtype="bf16")
    with pytest.raises(ValidationError, match="fp16"):
        encode_payload({"fc0.s": torch.tensor([1e6])}, dtype="fp16")
    with pytest.raises(ValidationError, match="bytes"):
        decode_payload("not bytes")  # type: ignore[arg-type]


def test_decode_values_is_one_float32_array_viewed_by_the_tensors() -> None:
    edit = make_edit(rank=4)
    data = encode_payload(edit, dtype="fp16", prototype=(2, 5))
    d = decode_values(data, spec=SPEC, max_rank=8)
    assert d.values.dtype == np.float32 and d.values.ndim == 1
    assert d.values.size == sum(t.numel() for t in edit.values())
    assert (d.prototype_id, d.prototype_version, d.dtype, d.nbytes) == (2, 5, "fp16", len(data))
    p = decode_payload(data, spec=SPEC, max_rank=8)
    for name, arr in d.arrays().items():
        np.testing.assert_array_equal(arr, p.tensors[name].numpy())
    assert set(d.layers()) == {"fc0", "fc1"} and d.layers()["fc1"]["u"].shape == (64, 4)


def test_a_cached_layout_never_stands_in_for_another_payload() -> None:
    """Layouts are cached by (length, dtype, count) and recognised by their descriptor
    bytes: a payload of the same length with other names or shapes is parsed afresh."""
    a = encode_payload({"fc0.bias": torch.ones(128)}, dtype="fp32")
    b = encode_payload({"fc9.bias": torch.ones(128)}, dtype="fp32")  # same length
    c = encode_payload({"f.bias": torch.ones(2, 64)}, dtype="fp32")  # same length too
    assert len(a) == len(b) == len(c)
    assert decode_payload(a, spec=SPEC).tensors["fc0.bias"].shape == (128,)
    with pytest.raises(ValidationError, match="unknown head layer"):
        decode_payload(b, spec=SPEC)
    assert set(decode_payload(b).tensors) == {"fc9.bias"}
    assert decode_payload(c).tensors["f.bias"].shape == (2, 64)
    body = bytearray(a[:-4])  # a's layout is cached; now corrupt its name, valid checksum
    body[body.index(b"fc0.bias") + 3] = ord("!")
    with pytest.raises(ValidationError, match="bad edit tensor name"):
        decode_payload(recrc(bytes(body)))
    body = bytearray(a[:-4])
    body[-4:] = np.array([np.inf], dtype="<f4").tobytes()
    with pytest.raises(ValidationError, match=r"'fc0\.bias' contains NaN or Inf"):
        decode_payload(recrc(bytes(body)), spec=SPEC)


def test_huge_finite_fp32_values_are_not_mistaken_for_inf() -> None:
    big = {"fc0.s": torch.tensor([3e38, -3e38])}  # the payload-wide sum of squares overflows
    back = decode_payload(encode_payload(big, dtype="fp32")).tensors["fc0.s"]
    assert torch.equal(back, big["fc0.s"])


def test_fp16_finite_check_takes_the_largest_values_and_refuses_inf() -> None:
    """The fp16 finite check is one sum of squares: fp16's largest values do not overflow
    it, an Inf does (and is named)."""
    peak = float(np.finfo(np.float16).max)
    big = {"fc0.u": torch.full((128, 8), peak), "fc0.s": torch.full((8,), -peak)}
    back = decode_payload(encode_payload(big, dtype="fp16")).tensors
    assert torch.equal(back["fc0.u"], big["fc0.u"]) and torch.equal(back["fc0.s"], big["fc0.s"])
    body = bytearray(encode_payload(big, dtype="fp16")[:-4])
    body[-2:] = np.array([np.inf], dtype="<f2").tobytes()  # the last value of fc0.u
    with pytest.raises(ValidationError, match=r"'fc0\.u' contains NaN or Inf"):
        decode_payload(recrc(bytes(body)))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_values_are_right_whatever_the_alignment_of_the_data(dtype: str) -> None:
    """Names of every length modulo 4 put the data at every byte offset; the gathered
    values (descriptors, pad, data) are still exactly each tensor's."""
    for layer in ("a", "ab", "abc", "abcd"):
        edit = {f"{layer}.bias": torch.arange(5.0) - 2, f"{layer}.s": torch.tensor([0.5, -1.0])}
        for _ in range(2):  # parsed, then from the cached layout
            back = decode_payload(encode_payload(edit, dtype=dtype)).tensors
            for name, t in edit.items():
                torch.testing.assert_close(back[name], t, atol=0.02, rtol=0)
