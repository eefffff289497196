"""Property test: random malformed requests to both servers get a proper status (never
INTERNAL / UNKNOWN), and correct requests keep working afterwards."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.rpc.device.v1 import recommendation_pb2 as pb

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
ITEMS = [f"i{n}" for n in range(30)]

ids = st.one_of(st.sampled_from(ITEMS), st.text(max_size=30), st.text(min_size=190, max_size=260))
users = st.one_of(st.sampled_from([f"u{n}" for n in range(24)]), st.text(max_size=30))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)

recommends = st.builds(
    lambda u, k, cand, inc, probes: pb.RecommendRequest(
        user_id=u,
        k=k,
        include_seen=inc,
        probe_item_ids=probes,
        **({"candidates": pb.CandidateSet(item_ids=cand)} if cand is not None else {}),
    ),
    users,
    st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 40),
    st.none() | st.lists(ids, max_size=60),
    st.booleans(),
    st.lists(ids, max_size=5) | st.just(["i1"] * 1001),
)
requests_now = st.builds(
    lambda u, w: pb.RequestEditRequest(user_id=u, wait_for_edit=w), users, st.booleans()
)
events = st.builds(
    lambda u, i, t: pb.RecordEventRequest(user_id=u, item_id=i, timestamp=t),
    users,
    ids,
    st.integers(-(2**63), 2**63 - 1),
)
edits = st.builds(
    lambda u, b: pb.ApplyEditRequest(user_id=u, edit_payload=b),
    users,
    st.binary(max_size=300) | st.just(b"RSE1").map(lambda m: m + bytes(40)),
)
generates = st.builds(
    lambda d, items, ts, summary, dtype, top_n: cpb.GenerateEditRequest(
        device_id=d,
        recent_item_ids=items,
        recent_timestamps=ts,
        summary=summary,
        payload_dtype=dtype,
        top_n=top_n,
    ),
    st.text(max_size=20) | st.text(min_size=199, max_size=210),
    st.lists(ids, max_size=8),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.lists(floats, max_size=5),
    st.integers(-3, 6),
    st.integers(0, 2**32 - 1),
)
prototypes = st.builds(
    lambda p, v, d: cpb.GetPrototypeRequest(prototype_id=p, version=v, payload_dtype=d),
    st.integers(0, 2**32 - 1) | st.integers(0, 3),
    st.integers(0, 2**32 - 1) | st.integers(0, 3),
    st.integers(-2, 5),
)


@pytest.fixture(scope="module")
def cloud_stub(cloud):
    with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as channel:
        yield cpb_grpc.AdaptationServiceStub(channel)


def status(call, message) -> grpc.StatusCode:
    try:
        call(message, timeout=10)
    except grpc.RpcError as exc:
        assert exc.details(), "every error carries a message"
        return exc.code()
    return grpc.StatusCode.OK


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.one_of(
            recommends.map(lambda m: ("Recommend", m)),
            events.map(lambda m: ("RecordEvent", m)),
            edits.map(lambda m: ("ApplyEdit", m)),
            requests_now.map(lambda m: ("RequestEdit", m)),
            generates.map(lambda m: ("GenerateEdit", m)),
            prototypes.map(lambda m: ("GetPrototype", m)),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_random_requests_never_break_the_servers(stub, cloud_stub, calls) -> None:
    for method, message in calls:
        target = (
            cloud_stub
            if isinstance(message, cpb.GenerateEditRequest | cpb.GetPrototypeRequest)
            else stub
        )
        code = status(getattr(target, method), message)
        assert code in ALLOWED, (method, message, code)
    # correct requests still work on both servers
    assert len(stub.Recommend(pb.RecommendRequest(user_id="u1", k=3), timeout=10).items) == 3
    reply = cloud_stub.GenerateEdit(
        cpb.GenerateEditRequest(device_id="ok", recent_item_ids=["i1", "i2"]), timeout=10
    )
    assert reply.edit_payload
