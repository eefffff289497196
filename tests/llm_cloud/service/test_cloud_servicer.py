"""The AdaptationService in process: micro-batching, prototypes, deadlines, bad input."""

from __future__ import annotations

import time

import grpc
import pytest
from cloud_helpers import start

from recsys.edit_payload import decode_payload
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.serving.batching import BatchConfig


def request(n: int, **kw) -> cpb.GenerateEditRequest:
    return cpb.GenerateEditRequest(
        device_id=f"dev{n}", recent_item_ids=[f"i{n % 30}", f"i{(n + 3) % 30}"], **kw
    )


def test_generate_edit_and_prototypes(stub) -> None:
    reply = stub.GenerateEdit(request(1), timeout=10)
    payload = decode_payload(reply.edit_payload, spec={"fc0": (16, 8), "fc1": (8, 16)})
    assert reply.prototype_ref.id == payload.prototype_id
    assert reply.prototype.edit_payload and reply.edit_id >= 1
    assert list(reply.generated_item_ids)[:2] == ["i4", "i1"]  # most recent first
    listing = stub.ListPrototypes(cpb.ListPrototypesRequest(), timeout=10)
    assert reply.prototype_ref.id in {p.id for p in listing.prototypes}
    proto = stub.GetPrototype(
        cpb.GetPrototypeRequest(prototype_id=reply.prototype_ref.id), timeout=10
    )
    assert proto.ref.id == reply.prototype_ref.id and proto.edit_payload
    cached = request(1)
    cached.cached_prototype.CopyFrom(reply.prototype_ref)
    again = stub.GenerateEdit(cached, timeout=10)
    if again.prototype_ref == reply.prototype_ref:
        assert not again.HasField("prototype")  # not sent twice


def test_concurrent_calls_are_micro_batched(stub) -> None:
    futures = [stub.GenerateEdit.future(request(n), timeout=20) for n in range(24)]
    replies = [f.result() for f in futures]
    assert max(r.batch_size for r in replies) > 1
    assert len({r.edit_id for r in replies}) == 24


def test_batching_off(bg, catalogue) -> None:
    handle = start(bg, catalogue, None, batch=BatchConfig(max_batch=1, max_wait_ms=0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = cpb_grpc.AdaptationServiceStub(channel)
            futures = [stub.GenerateEdit.future(request(n), timeout=20) for n in range(8)]
            assert {f.result().batch_size for f in futures} == {1}
            # no store: absolute edits, no prototypes
            reply = futures[0].result()
            assert not reply.HasField("prototype_ref")
            assert decode_payload(reply.edit_payload).prototype_id is None
    finally:
        bg.run(handle.stop(0))


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: cpb.GenerateEditRequest(device_id="d"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: cpb.GenerateEditRequest(recent_item_ids=["i1"]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: request(1, summary=[1.0, float("nan")]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: request(1, payload_dtype=77), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda: cpb.GenerateEditRequest(device_id="d", recent_item_ids=["i1", "zz"]),
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
)
def test_bad_generate_requests(stub, make, code) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateEdit(make(), timeout=10)
    assert err.value.code() == code and err.value.details()


def test_bad_prototype_requests(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.GetPrototype(cpb.GetPrototypeRequest(prototype_id=0), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.GetPrototype(cpb.GetPrototypeRequest(prototype_id=4242), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.GetPrototype(cpb.GetPrototypeRequest(prototype_id=1, version=999), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_caller_deadline_is_honoured(bg, catalogue) -> None:
    handle = start(bg, catalogue, None, batch=BatchConfig(max_batch=1, max_wait_ms=0))
    engine = handle.engine
    real = engine.generate_edits

    def slow(requests):
        time.sleep(0.4)
        return real(requests)

    handle.servicer.batcher.fn = slow
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = cpb_grpc.AdaptationServiceStub(channel)
            futures = [stub.GenerateEdit.future(request(n), timeout=0.25) for n in range(4)]
            codes = []
            for f in futures:
                with pytest.raises(grpc.RpcError) as err:
                    f.result()
                codes.append(err.value.code())
            assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
            time.sleep(0.6)
            assert handle.servicer.batcher.stats()["dropped"] >= 1  # never ran for a gone caller
            handle.servicer.batcher.fn = real
            assert stub.GenerateEdit(request(9), timeout=10).edit_payload
    finally:
        bg.run(handle.stop(0))
