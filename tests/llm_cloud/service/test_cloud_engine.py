"""The adaptation engine (tiny, untrained pieces): edits, prototypes, edit log, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cloud_helpers import HEAD, ITEMS

from llm_cloud.service.engine import AdaptationEngine, EditRequest, build_request
from recsys.edit_payload import decode_payload
from recsys.errors import NotFoundError, ValidationError


def test_engine_satisfies_the_protocol(tiny_engine) -> None:
    assert isinstance(tiny_engine, AdaptationEngine)
    assert tiny_engine.info()["engine"] == "tiny"


def test_batch_of_edits(tiny_engine) -> None:
    requests = [EditRequest(f"d{n}", np.array([n, n + 1, n + 2], dtype=np.int64)) for n in range(6)]
    results = tiny_engine.generate_edits(requests)
    assert len(results) == 6 and all(r.batch_size == 6 for r in results)
    ids = [r.edit_id for r in results]
    assert ids == sorted(ids) and len(set(ids)) == 6
    for r in results:
        payload = decode_payload(r.payload, spec=HEAD)
        assert (payload.prototype_id, payload.prototype_version) == r.prototype
        assert r.prototype_payload is not None  # the device held no prototype
        proto = decode_payload(r.prototype_payload, spec=HEAD)
        assert proto.prototype_id is None
        assert set(payload.tensors) >= {"fc0.u", "fc0.s", "fc0.v"}
        assert r.generated_items and r.tokens.startswith("<a_")
    logged = tiny_engine.store.edits_for_device("d0")
    assert [e.id for e in logged] == [results[0].edit_id]
    assert logged[0].prototype_id == results[0].prototype[0]


def test_edits_depend_on_history_and_prototype_is_not_resent(tiny_engine) -> None:
    a, b = tiny_engine.generate_edits(
        [EditRequest("x", np.array([1, 2, 3])), EditRequest("y", np.array([20, 25, 29]))]
    )
    ta, tb = decode_payload(a.payload).tensors, decode_payload(b.payload).tensors
    assert not torch.equal(ta["fc0.s"], tb["fc0.s"])
    (again,) = tiny_engine.generate_edits(
        [EditRequest("x", np.array([1, 2, 3]), cached_prototype=a.prototype)]
    )
    if again.prototype == a.prototype:
        assert again.prototype_payload is None
    view = tiny_engine.get_prototype(a.prototype[0], a.prototype[1])
    assert decode_payload(view.payload, spec=HEAD).tensors
    assert {p.prototype_id for p in tiny_engine.list_prototypes()} >= {a.prototype[0]}
    with pytest.raises(NotFoundError):
        tiny_engine.get_prototype(999)


def test_int8_and_fp32_payloads(tiny_engine) -> None:
    r8, r32 = tiny_engine.generate_edits(
        [
            EditRequest("p", np.array([4, 5]), payload_dtype="int8"),
            EditRequest("q", np.array([4, 5]), payload_dtype="fp32"),
        ]
    )
    assert decode_payload(r8.payload).dtype == "int8"
    assert len(r8.payload) < len(r32.payload)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(item_ids=[]), ValidationError, "empty"),
        (dict(item_ids=["i1"] * 513), ValidationError, "limit"),
        (dict(item_ids=["nope"]), NotFoundError, "unknown item"),
        (dict(device_id=""), ValidationError, "device_id"),
        (dict(device_id="  "), ValidationError, "device_id"),
        (dict(timestamps=[1, 2, 3]), ValidationError, "timestamps"),
        (dict(summary=[float("nan")] * 4), ValidationError, "NaN"),
        (dict(payload_dtype="fp8"), ValidationError, "dtype"),
        (dict(top_n=1000), ValidationError, "top_n"),
    ],
)
def test_request_validation(tiny_engine, kwargs, error, words) -> None:
    base = dict(device_id="d", item_ids=["i1", "i2"])
    base.update(kwargs)
    index = {item: n for n, item in enumerate(ITEMS)}
    with pytest.raises(error, match=words):
        build_request(tiny_engine, index, **base)


def test_model_version_is_checked(tiny_engine) -> None:
    tiny_engine.model_version = "abc"
    index = {item: n for n, item in enumerate(ITEMS)}
    with pytest.raises(ValidationError, match="ranker"):
        build_request(tiny_engine, index, device_id="d", item_ids=["i1"], model_version="xyz")
    assert build_request(tiny_engine, index, device_id="d", item_ids=["i1"], model_version="abc")
