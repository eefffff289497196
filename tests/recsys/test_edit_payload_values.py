"""The decoded value array: grouped by part (every U, V, bias, s, dense), widened through
per-thread staging buffers that never leak into a decoded payload."""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest
import torch

from recsys.edit_payload import VALUE_ORDER, decode_payload, decode_values, encode_payload
from recsys.errors import ValidationError

SPEC = {"fc0": (128, 64), "fc1": (64, 128)}


def _edit(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in SPEC.items():  # payload order: layer by layer, part by part
        out[f"{name}.bias"] = torch.randn(o, generator=g) * 0.05
        out[f"{name}.s"] = torch.rand(rank, generator=g)
        out[f"{name}.u"] = torch.randn(o, rank, generator=g) * 0.1
        out[f"{name}.v"] = torch.randn(i, rank, generator=g) * 0.1
    return out


def test_values_are_grouped_by_part_and_the_names_keep_payload_order() -> None:
    edit = _edit(rank=4, seed=0)
    d = decode_values(encode_payload(edit, dtype="fp32"), spec=SPEC, max_rank=8)
    assert d.names == tuple(edit)  # payload order
    starts = {name: a for name, a, _, _ in d.slots}
    by_part = sorted(edit, key=lambda n: (VALUE_ORDER.index(n.rpartition(".")[2]), starts[n]))
    assert [starts[n] for n in by_part] == sorted(starts.values())  # u, v, bias, s blocks
    assert starts["fc0.u"] == 0 and starts["fc1.u"] == edit["fc0.u"].numel()
    for name, arr in d.arrays().items():
        np.testing.assert_array_equal(arr, edit[name].numpy())


def test_a_decoded_payload_keeps_its_values_when_the_next_one_is_decoded() -> None:
    """fp16 goes through staging buffers reused per length: a decoded payload must own
    its values, whatever is decoded after it."""
    a, b = (encode_payload(_edit(rank=8, seed=s), dtype="fp16") for s in (1, 2))
    assert len(a) == len(b)  # same length: the same staging buffers
    first = decode_values(a, spec=SPEC, max_rank=8)
    kept = first.values.copy()
    second = decode_values(b, spec=SPEC, max_rank=8)
    np.testing.assert_array_equal(first.values, kept)
    assert not np.shares_memory(first.values, second.values)
    assert not np.array_equal(first.values, second.values)


def test_threads_decoding_payloads_of_one_length_each_get_their_own() -> None:
    payloads = [encode_payload(_edit(rank=8, seed=s), dtype="fp16") for s in range(4)]
    want = [decode_payload(p).tensors for p in payloads]
    errors: list[str] = []

    def work(k: int) -> None:
        for _ in range(200):
            got = decode_values(payloads[k], spec=SPEC, max_rank=8).arrays()
            if any(not np.array_equal(got[n], want[k][n].numpy()) for n in got):
                errors.append(f"thread {k} read another payload's values")
                return

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_the_shape_check_is_skipped_only_for_the_same_spec_and_rank() -> None:
    """A layout remembers the last (spec, max_rank) it passed and compares the next by
    value: a spec changed in place, another rank bound, list / array / read-only specs
    are all checked as they should be."""
    data = encode_payload(_edit(rank=4, seed=3), dtype="fp16")
    spec = dict(SPEC)
    decode_values(data, spec=spec, max_rank=8)
    decode_values(data, spec=spec, max_rank=8)  # the remembered pair
    spec["fc0"] = (128, 32)  # changed in place after it passed
    with pytest.raises(ValidationError, match=r"'fc0\.v': shape \(64, 4\), expected \(32, 4\)"):
        decode_values(data, spec=spec, max_rank=8)
    with pytest.raises(ValidationError, match=r"rank 4 outside 1\.\.2"):
        decode_values(data, spec=SPEC, max_rank=2)
    with pytest.raises(ValidationError, match="unknown head layer 'fc1'"):
        decode_values(data, spec={"fc0": (128, 64)}, max_rank=8)
    decode_values(data, spec=types.MappingProxyType(dict(SPEC)), max_rank=8)
    decode_values(data, spec={k: list(v) for k, v in SPEC.items()}, max_rank=8)
    arrays = {k: np.array(v) for k, v in SPEC.items()}  # compare to no bool
    decode_values(data, spec=arrays, max_rank=8)
    arrays["fc1"] = np.array([64, 99])
    with pytest.raises(
        ValidationError, match=r"'fc1\.v': shape \(128, 4\), expected \(.*99.*, 4\)"
    ):
        decode_values(data, spec=arrays, max_rank=8)
