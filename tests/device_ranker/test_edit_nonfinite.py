"""NaN and +/-Inf in an edit payload are refused on every validation path of the device.

``decode_values`` leaves the NaN/Inf check to the first read of the decoded contents,
and the device's ``prepare_decoded`` skips it when its joint bound checks prove every
value finite. Here a NaN, +Inf or -Inf is written into each of U, V, the bias delta and
s of each layer (first or last element, fp16 and fp32 payloads, rank 8 and 16 on the
ml-100k head shape, valid checksum) and every path must refuse it with the decoder's
message naming the tensor: the joint path, the per-layer paths (layers of different
ranks; an element bound, i.e. the exact path; no norm bound, which proves nothing),
a residual composed with a held prototype, and every plain reader of a decoded payload.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from device_ranker.edit_apply import _plan, prepare_decoded
from device_ranker.edits import EditBounds, HeadEdit, LayerEdit, random_edit
from device_ranker.head import EditableHead
from device_ranker.ranker import Ranker
from recsys.edit_payload import (
    _HEADER,
    _parse_layout,
    decode_payload,
    decode_values,
    encode_payload,
)
from recsys.errors import ValidationError

DIMS = (64, 128, 64)  # the ml-100k head: fc0 [128, 64], fc1 [64, 128]
BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
_WIRE = {"fp32": "<f4", "fp16": "<f2"}
SPEC = EditableHead(DIMS).edit_spec()


def _poisoned(data: bytes, name: str, value: float, last: bool) -> bytes:
    """``data`` with the first (or last) element of tensor ``name`` set to ``value`` and
    the checksum made valid again."""
    body = bytearray(data[:-4])
    dtype = {1: "fp32", 2: "fp16", 3: "int8"}[body[5]]
    count = struct.unpack_from("<H", body, _HEADER.size - 2)[0]
    layout = _parse_layout(bytes(body), dtype, count)
    start, stop = layout.data[layout.names.index(name)]
    size = np.dtype(_WIRE[dtype]).itemsize
    at = stop - size if last else start
    body[at : at + size] = np.array([value], dtype=_WIRE[dtype]).tobytes()
    return bytes(body) + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _cases():
    """(tensor, value label, last element?) for every part of every layer."""
    for layer in ("fc0", "fc1"):
        for part in ("u", "v", "bias", "s"):
            for label in BAD:
                yield f"{layer}.{part}", label, part in ("u", "v")


def _refused(data: bytes, name: str, prepare) -> None:
    """Decoding (as the device does, with the head's spec) and ``prepare`` refuse
    ``data`` naming ``name``; a reader of the decoded payload gets the same error."""
    match = rf"edit tensor '{name}' contains NaN or Inf"
    decoded = decode_values(data, spec=SPEC, max_rank=64)  # decoding alone does not check
    assert not decoded.finite  # so the refusal below is prepare's, on the path under test
    with pytest.raises(ValidationError, match=match):
        prepare(decoded)
    decoded = decode_values(data, spec=SPEC, max_rank=64)  # the layout's check is cached
    with pytest.raises(ValidationError, match=match):
        decoded.values  # noqa: B018


def _edit(head: EditableHead, ranks: tuple[int, int], seed: int) -> HeadEdit:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    full = random_edit(head, max(ranks), 0.01, generator=g)
    for (name, le), r in zip(full.layers.items(), ranks, strict=True):
        layers[name] = LayerEdit(u=le.u[:, :r], s=le.s[:r], v=le.v[:, :r], bias=le.bias)
    return HeadEdit(layers)


PATHS = {
    # (bounds, ranks of fc0 / fc1 as a function of the rank, expected plan)
    "joint": (EditBounds(), lambda r: (r, r)),
    "per-layer, ranks differ": (EditBounds(), lambda r: (r, r - 1)),
    "exact, element bound": (EditBounds(max_weight_abs=1.0), lambda r: (r, r)),
    "joint, no norm bound": (EditBounds(max_weight_norm=None), lambda r: (r, r)),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("rank", [8, 16])
def test_every_device_path_refuses_nan_and_inf_naming_the_tensor(
    path: str, dtype: str, rank: int
) -> None:
    head = EditableHead(DIMS)
    bounds, ranks = PATHS[path]
    data = encode_payload(_edit(head, ranks(rank), seed=rank).to_flat(), dtype=dtype)
    clean = decode_values(data, spec=SPEC, max_rank=64)
    joint = _plan(head, clean, bounds).joint
    proves = {
        "joint": True,
        "per-layer, ranks differ": None,  # no joint form at all
        "exact, element bound": None,
        "joint, no norm bound": False,  # a joint form whose unbounded norm proves nothing
    }[path]
    assert (joint if proves is None else joint.proves_finite) == proves
    prepare_decoded(head, clean, bounds)  # the clean edit is accepted on this path
    for name, label, last in _cases():
        bad = _poisoned(data, name, BAD[label], last)
        _refused(bad, name, lambda d, b=bounds: prepare_decoded(head, d, b))


PROTO_CASES = {
    # (bounds, prototype layers, the clean residual's error)
    "composed fast path": (EditBounds(), ("fc0", "fc1"), None),
    "no norm bound": (EditBounds(max_weight_norm=None), ("fc0", "fc1"), None),
    "prototype of one layer": (EditBounds(), ("fc0",), None),
    "composed rank over the bound": (
        EditBounds(max_rank=10),
        ("fc0", "fc1"),
        r"layer .fc0.: s must be 1-D of length r in 1\.\.10, got shape \(12,\)",
    ),
}


@pytest.mark.parametrize("case", list(PROTO_CASES))
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_a_residual_composed_with_a_held_prototype_refuses_nan_and_inf(
    case: str, dtype: str
) -> None:
    """A rank-4 residual of a held rank-8 prototype, on the composed fast path, without a
    norm bound, with a prototype of one layer (the other composed on the exact path), and
    with a composed rank over the bound: NaN/Inf is refused with the decoder's message,
    before the rank error."""
    bounds, proto_layers, clean_error = PROTO_CASES[case]
    head = EditableHead(DIMS)
    g = torch.Generator().manual_seed(1)
    full = random_edit(head, rank=8, scale=0.01, generator=g)
    prototype = HeadEdit({k: full.layers[k] for k in proto_layers})
    residual = random_edit(head, rank=4, scale=0.01, generator=g)
    data = encode_payload(residual.to_flat(), dtype=dtype, prototype=(1, 1))
    clean = decode_values(data, spec=SPEC, max_rank=64)  # the layout's shape check, once
    if clean_error is None:
        prepare_decoded(head, clean, bounds, prototype)  # clean: accepted
        assert clean.finite
    else:
        with pytest.raises(ValidationError, match=clean_error):
            prepare_decoded(head, clean, bounds, prototype)
    for name, label, last in _cases():
        bad = _poisoned(data, name, BAD[label], last)
        _refused(bad, name, lambda d, b=bounds: prepare_decoded(head, d, b, prototype))


def test_the_ranker_refuses_it_and_keeps_its_active_edit(tiny_model) -> None:
    """Through ``Ranker.prepare_decoded`` / ``apply_edit`` as the device service calls
    them: the refused payload changes nothing."""
    ranker = Ranker(tiny_model)
    head, spec = tiny_model.head, ranker.payload_spec
    edit = random_edit(head, rank=4, scale=0.01, generator=torch.Generator().manual_seed(2))
    data = encode_payload(edit.to_flat(), dtype="fp16")
    good = ranker.apply_edit(ranker.prepare_decoded(decode_values(data, spec=spec, max_rank=8)))
    names = decode_values(data).names
    for name in names:
        for value in BAD.values():
            bad = _poisoned(data, name, value, last=False)
            with pytest.raises(ValidationError, match=rf"'{name}' contains NaN or Inf"):
                ranker.apply_edit(ranker.prepare_decoded(decode_values(bad, spec=spec, max_rank=8)))
            assert ranker._active is good


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_every_reader_of_a_decoded_payload_gets_the_decoders_error(dtype: str) -> None:
    """``decode_payload`` (tensors), ``values``, ``arrays``, ``layers``, ``tensors`` and
    the prototype fields (what the device service peeks at before preparing) all refuse a
    non-finite payload, as decoding did when it checked eagerly."""
    edit = random_edit(EditableHead(DIMS), 8, 0.01, generator=torch.Generator().manual_seed(4))
    data = encode_payload(edit.to_flat(), dtype=dtype, prototype=(3, 7))
    bad = _poisoned(data, "fc1.v", float("nan"), last=True)
    match = r"edit tensor 'fc1\.v' contains NaN or Inf"
    with pytest.raises(ValidationError, match=match):
        decode_payload(bad)
    readers = {
        "values": lambda d: d.values,
        "arrays": lambda d: d.arrays(),
        "layers": lambda d: d.layers(),
        "tensors": lambda d: d.tensors(),
        "prototype_id": lambda d: d.prototype_id,
        "prototype_version": lambda d: d.prototype_version,
        "check_finite": lambda d: d.check_finite(),
    }
    for reader in readers.values():
        decoded = decode_values(bad)
        with pytest.raises(ValidationError, match=match):
            reader(decoded)
        with pytest.raises(ValidationError, match=match):  # and again: it stays refused
            reader(decoded)
    clean = decode_values(data)
    assert clean.prototype_id == 3 and not np.isnan(clean.values).any()
    assert clean.prototype_version == 7  # the positional construction keeps the order


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_int8_values_that_overflow_float32_are_refused() -> None:
    """int8 wire values are finite, but a huge (finite) scale makes them overflow to Inf
    when widened: refused like any Inf."""
    edit = random_edit(EditableHead(DIMS), 8, 0.01, generator=torch.Generator().manual_seed(6))
    data = encode_payload(edit.to_flat(), dtype="int8")
    body = bytearray(data[:-4])
    layout = _parse_layout(bytes(body), "int8", len(layout_names := decode_values(data).names))
    at = layout.scales[layout_names.index("fc0.u")]
    body[at : at + 4] = struct.pack("<f", 3e38)
    bad = bytes(body) + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
    head = EditableHead(DIMS)
    with pytest.raises(ValidationError, match=r"edit tensor 'fc0\.u' contains NaN or Inf"):
        prepare_decoded(head, decode_values(bad, spec=head.edit_spec(), max_rank=64))


def test_an_accepted_payload_is_marked_finite_without_a_second_check() -> None:
    head = EditableHead(DIMS)
    edit = random_edit(head, 8, 0.01, generator=torch.Generator().manual_seed(7))
    decoded = decode_values(encode_payload(edit.to_flat(), dtype="fp16"))
    assert not decoded.finite
    prepared = prepare_decoded(head, decoded)
    assert decoded.finite  # proved by the joint bounds
    assert torch.equal(prepared.edit.layers["fc0"].u, decoded.tensors()["fc0.u"])
