"""The RSE1 edit payload codec measured against safetensors and protobuf.

The payload measured is the real one: a rank-8 low-rank edit of the device head at D=64,
H=128 (``fc0``: 128x64, ``fc1``: 64x128; per layer ``u`` [out, R], ``s`` [R], ``v``
[in, R], ``bias`` [out]: 386 R + 192 = 3,280 values), in fp16 and int8 (one symmetric
scale per tensor, :func:`recsys.edit_payload.quantise`, shared by all three codecs so
that they carry identical numbers).

Codecs:

* ``rse1``: :func:`recsys.edit_payload.encode_payload` / ``decode_payload(spec=head)``,
  as the cloud and the device call them.
* ``safetensors``: ``safetensors.numpy.save`` / ``load`` of the wire arrays, plus a
  ``__scales__`` F32 [T] tensor (int8) and a ``__prototype__`` U32 [2] tensor.
* ``protobuf``: a small proto3 message (``Edit { dtype, has_prototype, prototype_id,
  prototype_version, repeated Tensor { name, shape, data (bytes), scale } }``), built
  at run time from a descriptor (no generated module); decoding is ``ParseFromString``
  plus ``np.frombuffer(...).reshape(shape)``.

Figures per codec and dtype: size in bytes (and the overhead over the raw values),
encode and decode time (median over ``runs`` calls, in microseconds) and what decoding
catches, measured by trying it: the share of single-bit flips and of truncations that
raise, and whether a NaN value, a shape that does not fit the head and an unknown
element dtype are refused (anywhere between encode and the decoded tensors; for the
alternatives that includes the few lines of glue above, e.g. ``reshape``).

Example::

    result = run_payload_benchmark(runs=200)
    print_payload_table(result)           # or: recsys bench payload --json PATH
    result["rows"][0]["bytes"]            # RSE1 fp16 size
"""

from __future__ import annotations

import functools
import logging
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recsys.edit_payload import (
    DTYPES,
    decode_payload,
    dequantise,
    encode_payload,
    quantise,
)
from recsys.reporting import print_table

logger = logging.getLogger(__name__)

HEAD = {"fc0": (128, 64), "fc1": (64, 128)}  # {layer: (out, in)} at D=64, H=128
RANK = 8
_WIRE = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "int8": np.dtype("i1")}
_CODES = {code: name for name, code in DTYPES.items()}

Tensors = Mapping[str, torch.Tensor]
Prototype = tuple[int, int] | None


@dataclass(frozen=True)
class Codec:
    """A payload format: ``encode(tensors, dtype, prototype) -> bytes`` and
    ``decode(bytes) -> {name: float32 tensor}``."""

    name: str
    encode: Callable[[Tensors, str, Prototype], bytes]
    decode: Callable[[bytes], dict[str, torch.Tensor]]


def sample_edit(rank: int = RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """A flat low-rank edit of :data:`HEAD` with the adaptor's typical magnitudes: unit
    columns in u and v, singular values s in [0, 0.3), bias deltas ~ N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for layer, (o, i) in HEAD.items():
        out[f"{layer}.u"] = torch.nn.functional.normalize(torch.randn(o, rank, generator=g), dim=0)
        out[f"{layer}.s"] = torch.rand(rank, generator=g) * 0.3
        out[f"{layer}.v"] = torch.nn.functional.normalize(torch.randn(i, rank, generator=g), dim=0)
        out[f"{layer}.bias"] = torch.randn(o, generator=g) * 0.05
    return out


def _wire_arrays(tensors: Tensors, dtype: str) -> tuple[list[str], list[np.ndarray], list[float]]:
    """Sorted names, their wire arrays and scales (the alternatives' shared quantisation)."""
    names = sorted(tensors)
    wires, scales = [], []
    with np.errstate(invalid="ignore"):  # a NaN goes through as whatever the cast makes
        for name in names:
            wire, scale = quantise(name, tensors[name].detach().float().numpy(), dtype)
            wires.append(wire)
            scales.append(scale)
    return names, wires, scales


# ---- RSE1 -----------------------------------------------------------------------------
def _rse1_encode(tensors: Tensors, dtype: str, prototype: Prototype) -> bytes:
    return encode_payload(tensors, dtype=dtype, prototype=prototype)


def _rse1_decode(data: bytes) -> dict[str, torch.Tensor]:
    return decode_payload(data, spec=HEAD).tensors


# ---- safetensors ----------------------------------------------------------------------
def _st_encode(tensors: Tensors, dtype: str, prototype: Prototype) -> bytes:
    from safetensors.numpy import save

    names, wires, scales = _wire_arrays(tensors, dtype)
    arrays = dict(zip(names, wires, strict=True))
    if dtype == "int8":
        arrays["__scales__"] = np.asarray(scales, np.float32)
    if prototype is not None:
        arrays["__prototype__"] = np.asarray(prototype, np.uint32)
    return save(arrays)


def _st_decode(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.numpy import load

    arrays = load(data)
    scales = arrays.pop("__scales__", None)
    arrays.pop("__prototype__", None)
    out = {}
    for k, name in enumerate(sorted(arrays)):
        wire = arrays[name]
        if scales is not None:
            out[name] = torch.from_numpy(dequantise(wire, "int8", float(scales[k])))
        else:
            out[name] = torch.from_numpy(wire.astype(np.float32))
    return out


# ---- protobuf -------------------------------------------------------------------------
# the two messages' fields: (message, field, number, type, repeated, message type)
_PB_FIELDS = (
    ("Tensor", "name", 1, "STRING", False, ""),
    ("Tensor", "shape", 2, "UINT32", True, ""),
    ("Tensor", "data", 3, "BYTES", False, ""),
    ("Tensor", "scale", 4, "FLOAT", False, ""),
    ("Edit", "dtype", 1, "UINT32", False, ""),
    ("Edit", "has_prototype", 2, "BOOL", False, ""),
    ("Edit", "prototype_id", 3, "UINT32", False, ""),
    ("Edit", "prototype_version", 4, "UINT32", False, ""),
    ("Edit", "tensors", 5, "MESSAGE", True, ".recsys.bench.v1.Tensor"),
)


@functools.cache
def _edit_message() -> type:
    """The ``recsys.bench.v1.Edit`` message class, built from a descriptor at run time."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="recsys_bench_edit.proto", package="recsys.bench.v1", syntax="proto3"
    )
    messages = {name: proto.message_type.add(name=name) for name in ("Tensor", "Edit")}
    for message, name, number, kind, repeated, type_name in _PB_FIELDS:
        field = messages[message].field.add(
            name=name,
            number=number,
            type=getattr(f, f"TYPE_{kind}"),
            label=f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL,
        )
        if type_name:
            field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("recsys.bench.v1.Edit"))


def _pb_encode(tensors: Tensors, dtype: str, prototype: Prototype) -> bytes:
    msg = _edit_message()(dtype=DTYPES[dtype], has_prototype=prototype is not None)
    if prototype is not None:
        msg.prototype_id, msg.prototype_version = prototype
    for name, wire, scale in zip(*_wire_arrays(tensors, dtype), strict=True):
        msg.tensors.add(name=name, shape=wire.shape, data=wire.tobytes(), scale=scale)
    return msg.SerializeToString()


def _pb_decode(data: bytes) -> dict[str, torch.Tensor]:
    msg = _edit_message()()
    msg.ParseFromString(data)
    dtype = _CODES[msg.dtype]
    out = {}
    for t in msg.tensors:
        wire = np.frombuffer(t.data, dtype=_WIRE[dtype]).reshape(tuple(t.shape))
        out[t.name] = torch.from_numpy(dequantise(wire, dtype, t.scale))
    return out


CODECS = (
    Codec("rse1", _rse1_encode, _rse1_decode),
    Codec("safetensors", _st_encode, _st_decode),
    Codec("protobuf", _pb_encode, _pb_decode),
)


# ---- measurements ---------------------------------------------------------------------
def _p50_us(fn: Callable[[], Any], runs: int) -> float:
    for _ in range(min(20, runs)):  # warm-up (lazy imports, caches)
        fn()
    times = np.empty(runs)
    for k in range(runs):
        start = time.perf_counter_ns()
        fn()
        times[k] = time.perf_counter_ns() - start
    return float(np.median(times)) / 1e3


def _raises(fn: Callable[[], Any]) -> bool:
    try:
        with np.errstate(invalid="ignore"):
            fn()
    except Exception:  # any refusal counts as detection
        return True
    return False


def _percent(decode: Callable[[Any], Any], cases: np.ndarray) -> int:
    """Share of ``cases`` (in whole %) for which ``decode(case)`` raises."""
    return round(100.0 * float(np.mean([_raises(lambda c=c: decode(c)) for c in cases])))


def _rse1_with_bad_dtype(data: bytes) -> bytes:
    """An RSE1 payload whose dtype code (header byte 5) is 9, with a valid CRC."""
    body = bytearray(data[:-4])
    body[5] = 9
    return bytes(body) + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _bad_dtype_payload(codec: Codec, edit: Tensors, dtype: str) -> bytes:
    """A payload of ``codec`` with an element dtype that is none of fp32/fp16/int8."""
    if codec.name == "rse1":
        return _rse1_with_bad_dtype(codec.encode(edit, dtype, (3, 12)))
    if codec.name == "safetensors":
        from safetensors.numpy import save

        return save({k: t.double().numpy() for k, t in edit.items()})  # F64
    msg = _edit_message()()
    msg.ParseFromString(codec.encode(edit, dtype, (3, 12)))
    msg.dtype = 9
    return msg.SerializeToString()


def measure_codec(codec: Codec, dtype: str, *, runs: int, trials: int, seed: int) -> dict[str, Any]:
    """One row of the comparison (see the module docstring)."""
    edit = sample_edit(seed=seed)
    data = codec.encode(edit, dtype, (3, 12))
    decoded = codec.decode(data)
    reference = decode_payload(encode_payload(edit, dtype=dtype, prototype=(3, 12))).tensors
    if decoded.keys() != reference.keys() or any(
        not torch.equal(decoded[k], reference[k]) for k in reference
    ):
        raise AssertionError(f"{codec.name} {dtype} does not carry the same numbers as RSE1")
    values = sum(t.numel() for t in edit.values())
    rng = np.random.default_rng(seed)
    flips = rng.integers(0, 8 * len(data), size=trials)
    cuts = rng.integers(1, len(data), size=trials)

    def flipped(bit: int) -> bytes:
        out = bytearray(data)
        out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)

    nan_edit = {**edit, "fc0.s": edit["fc0.s"].clone()}
    nan_edit["fc0.s"][0] = float("nan")
    wide = {**edit, "fc0.u": torch.zeros(HEAD["fc0"][0] + 1, RANK)}  # one row too many
    return {
        "codec": codec.name,
        "dtype": dtype,
        "bytes": len(data),
        "overhead_B": len(data) - values * _WIRE[dtype].itemsize,
        "encode_us_p50": round(_p50_us(lambda: codec.encode(edit, dtype, (3, 12)), runs)),
        "decode_us_p50": round(_p50_us(lambda: codec.decode(data), runs)),
        "bit_flips_caught_%": _percent(lambda b: codec.decode(flipped(int(b))), flips),
        "truncations_caught_%": _percent(lambda c: codec.decode(data[: int(c)]), cuts),
        "nan_refused": _raises(lambda: codec.decode(codec.encode(nan_edit, dtype, None))),
        "bad_shape_refused": _raises(lambda: codec.decode(codec.encode(wide, dtype, None))),
        "bad_dtype_refused": _raises(lambda: codec.decode(_bad_dtype_payload(codec, edit, dtype))),
    }


def run_payload_benchmark(
    *,
    runs: int = 1000,
    trials: int = 400,
    seed: int = 0,
    dtypes: Sequence[str] = ("fp16", "int8"),
    codecs: Sequence[Codec] = CODECS,
) -> dict[str, Any]:
    """Every codec at every dtype: ``{"config": ..., "rows": [measure_codec(...), ...]}``
    (JSON-able; rows in codec order within each dtype)."""
    rows = [
        measure_codec(c, d, runs=runs, trials=trials, seed=seed) for d in dtypes for c in codecs
    ]
    config = {"head": HEAD, "rank": RANK, "runs": runs, "trials": trials, "seed": seed}
    return {"benchmark": "edit-payload-codecs", "config": config, "rows": rows}


def print_payload_table(result: Mapping[str, Any]) -> None:
    cfg = result["config"]
    print_table(
        result["rows"],
        title=(
            f"Edit payload codecs: rank-{cfg['rank']} edit of the D=64/H=128 head; times are "
            f"medians of {cfg['runs']} calls (us); *_caught_% = share of {cfg['trials']} "
            "random single-bit flips / truncations that decoding refuses"
        ),
    )
