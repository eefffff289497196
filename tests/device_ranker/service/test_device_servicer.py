"""The device RecommendationService in process: answers, edits, fallback, bad input."""

from __future__ import annotations

import struct
import time
import zlib

import grpc
import numpy as np
import pytest
import torch

from device_ranker.edits import random_edit
from recsys.edit_payload import encode_payload
from recsys.rpc.device.v1 import recommendation_pb2 as pb


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_recommend_full_catalogue_excludes_seen(stub, device) -> None:
    reply = stub.Recommend(pb.RecommendRequest(user_id="u1", k=5), timeout=10)
    ids = [it.item_id for it in reply.items]
    assert len(ids) == 5 and len(set(ids)) == 5
    scores = [it.score for it in reply.items]
    assert scores == sorted(scores, reverse=True)
    seen = {device.engine.item_ids[i] for i in device.engine.users["u1"].seen}
    assert not seen & set(ids)
    assert reply.mode in (pb.SERVING_MODE_BASE, pb.SERVING_MODE_EDITED)


def test_candidates_restrict_and_k_caps(stub, device) -> None:
    seen = {device.engine.item_ids[i] for i in device.engine.users["u2"].seen}
    unseen = [i for i in device.engine.item_ids if i not in seen][:3]
    reply = stub.Recommend(
        pb.RecommendRequest(user_id="u2", k=10, candidates=pb.CandidateSet(item_ids=unseen * 2)),
        timeout=10,
    )
    assert sorted(it.item_id for it in reply.items) == sorted(unseen)  # k capped, dupes ignored
    everything = stub.Recommend(
        pb.RecommendRequest(user_id="u2", k=1000, include_seen=True), timeout=10
    )
    assert len(everything.items) == device.engine.ranker.num_items


def test_recommend_matches_the_ranker(stub, device) -> None:
    """The batched, state-cached path gives the ranker's own answer."""
    engine = device.engine
    st = engine.users["u3"]
    reply = stub.Recommend(pb.RecommendRequest(user_id="u3", k=5, base_model=True), timeout=10)
    rec = engine.ranker.recommend(list(st.history), k=5, edit="base")
    assert [it.item_id for it in reply.items] == rec.item_ids
    assert reply.mode == pb.SERVING_MODE_BASE
    np.testing.assert_allclose([it.score for it in reply.items], rec.scores.numpy(), rtol=1e-5)


def test_probes_score_and_rank_like_the_metrics(stub, device) -> None:
    """Probe scores are the ranker's logits; probe ranks are recsys.metrics.target_ranks
    over the catalogue minus the history (a probe in the history still counts itself)."""
    from recsys.metrics import target_ranks

    engine = device.engine
    st = engine.users["u7"]
    seen_item = engine.item_ids[next(iter(st.seen))]
    probes = ["i0", "i5", "i29", seen_item, "i5"]
    reply = stub.Recommend(
        pb.RecommendRequest(user_id="u7", k=3, base_model=True, probe_item_ids=probes),
        timeout=10,
    )
    with torch.inference_mode():
        scores = engine.ranker.scores([np.asarray(st.history)], edit="base")[0]  # [I]
    idx = torch.tensor([engine.item_index[p] for p in probes])
    np.testing.assert_allclose(reply.probe_scores, scores[idx].numpy(), rtol=1e-5, atol=1e-6)
    exclude = torch.zeros(len(probes), engine.ranker.num_items, dtype=torch.bool)
    exclude[:, sorted(st.seen)] = True
    row = scores.clone()
    row[idx] = torch.tensor(reply.probe_scores)  # ranks must agree exactly on these scores
    want = target_ranks(row.expand(len(probes), -1).contiguous(), idx, exclude)
    assert list(reply.probe_ranks) == want.tolist()
    assert reply.probe_ranks[1] == reply.probe_ranks[4]  # duplicates allowed
    top = stub.Recommend(
        pb.RecommendRequest(user_id="u7", k=1, probe_item_ids=[reply.items[0].item_id]),
        timeout=10,
    )
    assert list(top.probe_ranks) == [1]


def test_bad_probes(stub) -> None:
    got, details = code_of(
        stub.Recommend, pb.RecommendRequest(user_id="u1", k=3, probe_item_ids=["i1", "nope"])
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "unknown probe item 'nope'" in details
    got, details = code_of(
        stub.Recommend, pb.RecommendRequest(user_id="u1", k=3, probe_item_ids=["i1"] * 1001)
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "limit is 1000" in details


def test_request_edit_without_an_event(stub) -> None:
    before = stub.GetStatus(pb.GetStatusRequest(user_id="u8"), timeout=10).user
    reply = stub.RequestEdit(pb.RequestEditRequest(user_id="u8", wait_for_edit=True), timeout=10)
    assert reply.outcome == pb.EDIT_OUTCOME_APPLIED and reply.mode == pb.SERVING_MODE_EDITED
    cost = reply.cost
    assert cost.bytes_up > 0 and cost.bytes_down > cost.payload_bytes > 0
    assert cost.device_decode_us > 0 and cost.device_apply_us > 0 and reply.edit.edit_id >= 1
    after = stub.GetStatus(pb.GetStatusRequest(user_id="u8"), timeout=10).user
    assert after.history_length == before.history_length  # no event was recorded
    assert after.bytes_up == before.bytes_up + cost.bytes_up
    got, _ = code_of(stub.RequestEdit, pb.RequestEditRequest(user_id="ghost"))
    assert got == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.RecommendRequest(user_id="nobody", k=5), grpc.StatusCode.NOT_FOUND, "unknown user"),
        (pb.RecommendRequest(user_id="", k=5), grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
        (pb.RecommendRequest(user_id="x" * 201, k=5), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (pb.RecommendRequest(user_id="u1", k=0), grpc.StatusCode.INVALID_ARGUMENT, "k must"),
        (pb.RecommendRequest(user_id="u1", k=-3), grpc.StatusCode.INVALID_ARGUMENT, "k must"),
        (
            pb.RecommendRequest(user_id="u1", k=2**31 - 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "k must",
        ),
        (
            pb.RecommendRequest(user_id="u1", k=5, candidates=pb.CandidateSet()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "empty",
        ),
        (
            pb.RecommendRequest(
                user_id="u1", k=5, candidates=pb.CandidateSet(item_ids=["i1"] * 51)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "limit is 50",
        ),
        (
            pb.RecommendRequest(user_id="u1", k=5, candidates=pb.CandidateSet(item_ids=["zz"])),
            grpc.StatusCode.NOT_FOUND,
            "unknown item",
        ),
    ],
)
def test_bad_recommend_requests(stub, request_, code, words) -> None:
    got, details = code_of(stub.Recommend, request_)
    assert got == code
    assert words in details


def test_bad_events_and_status(stub) -> None:
    got, details = code_of(
        stub.RecordEvent, pb.RecordEventRequest(user_id="u1", item_id="nope", timestamp=1)
    )
    assert got == grpc.StatusCode.NOT_FOUND and "unknown item" in details
    got, details = code_of(
        stub.RecordEvent, pb.RecordEventRequest(user_id="u1", item_id="i1", timestamp=-1)
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "timestamp" in details
    got, _ = code_of(stub.RecordEvent, pb.RecordEventRequest(user_id="", item_id="i1"))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    got, details = code_of(stub.GetStatus, pb.GetStatusRequest(user_id="ghost"))
    assert got == grpc.StatusCode.NOT_FOUND


def _nan_payload(spec: dict[str, tuple[int, int]]) -> bytes:
    """A well-formed fp32 payload (valid CRC) whose first value is NaN."""
    name, (out_f, _) = next(iter(spec.items()))
    data = bytearray(encode_payload({f"{name}.bias": torch.zeros(out_f)}, dtype="fp32"))
    body = data[:-4]
    body[-4 * out_f : -4 * out_f + 4] = struct.pack("<f", float("nan"))
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)


def test_bad_edit_payloads(stub, device) -> None:
    spec = device.engine.ranker.edit_spec()
    name, (out_f, in_f) = next(iter(spec.items()))
    cases = [
        (b"garbage bytes", "truncated"),
        (b"garbage bytes" * 4, "not an edit payload"),
        (encode_payload({f"{name}.bias": torch.zeros(out_f)})[:-9], "checksum"),
        (_nan_payload(spec), "NaN"),
        (encode_payload({"fc9.bias": torch.zeros(3)}), "unknown head layer"),
        (encode_payload({f"{name}.dense": torch.full((out_f, in_f), 50.0)}), "bound"),
        (encode_payload({f"{name}.bias": torch.zeros(out_f + 1)}), "shape"),
    ]
    for payload, words in cases:
        got, details = code_of(
            stub.ApplyEdit, pb.ApplyEditRequest(user_id="u4", edit_payload=payload)
        )
        assert got == grpc.StatusCode.INVALID_ARGUMENT, (words, details)
        assert words in details, (words, details)
    got, details = code_of(
        stub.ApplyEdit,
        pb.ApplyEditRequest(
            user_id="u4",
            edit_payload=encode_payload({f"{name}.bias": torch.zeros(out_f)}, prototype=(99, 1)),
        ),
    )
    assert got == grpc.StatusCode.NOT_FOUND and "prototype 99" in details


def test_pushed_edit_changes_scores_and_reverts(stub, device) -> None:
    before = stub.Recommend(pb.RecommendRequest(user_id="u5", k=5), timeout=10)
    edit = random_edit(device.engine.ranker.model.head, rank=2, scale=0.3, bias=False,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    reply = stub.ApplyEdit(
        pb.ApplyEditRequest(user_id="u5", edit_payload=encode_payload(edit.to_flat()), source="t"),
        timeout=10,
    )
    assert reply.edit.edit_id >= 1 and reply.edit.source == "t"
    edited = stub.Recommend(pb.RecommendRequest(user_id="u5", k=5), timeout=10)
    assert [it.score for it in edited.items] != [it.score for it in before.items]
    assert edited.edit.edit_id == reply.edit.edit_id
    stub.ApplyEdit(pb.ApplyEditRequest(user_id="u5", edit_payload=b""), timeout=10)
    after = stub.Recommend(pb.RecommendRequest(user_id="u5", k=5), timeout=10)
    assert [(it.item_id, it.score) for it in after.items] == [
        (it.item_id, it.score) for it in before.items
    ]
    assert not after.HasField("edit")


def test_event_triggers_an_edit_from_the_cloud(stub, device) -> None:
    reply = stub.RecordEvent(
        pb.RecordEventRequest(user_id="u6", item_id="i0", timestamp=10**9, wait_for_edit=True),
        timeout=10,
    )
    assert reply.edit_requested and reply.outcome == pb.EDIT_OUTCOME_APPLIED
    assert reply.mode == pb.SERVING_MODE_EDITED
    assert reply.edit.edit_id >= 1 and reply.edit.prototype_id >= 1
    status = stub.GetStatus(pb.GetStatusRequest(user_id="u6"), timeout=10)
    assert status.ready and status.cloud_reachable
    assert status.user.edit.edit_id == reply.edit.edit_id
    assert status.user.bytes_up > 0 and status.user.bytes_down > 0
    rec = stub.Recommend(pb.RecommendRequest(user_id="u6", k=3), timeout=10)
    assert rec.mode == pb.SERVING_MODE_EDITED and not rec.fallback
    # a second event gets a newer edit; the device now holds the prototype
    again = stub.RecordEvent(
        pb.RecordEventRequest(user_id="u6", item_id="i1", timestamp=10**9 + 1, wait_for_edit=True),
        timeout=10,
    )
    assert again.outcome == pb.EDIT_OUTCOME_APPLIED
    assert again.edit.edit_id > reply.edit.edit_id


def test_new_user_is_created_by_its_first_event(stub) -> None:
    reply = stub.RecordEvent(
        pb.RecordEventRequest(user_id="newcomer", item_id="i2", timestamp=5), timeout=10
    )
    assert reply.new_user and reply.history_length == 1
    assert reply.outcome == pb.EDIT_OUTCOME_NOT_REQUESTED  # min_history 2
    rec = stub.Recommend(pb.RecommendRequest(user_id="newcomer", k=3), timeout=10)
    assert len(rec.items) == 3 and "i2" not in [it.item_id for it in rec.items]


def test_status_without_user(stub, device) -> None:
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.ready and status.num_items == device.engine.ranker.num_items
    assert status.num_users >= 20 and not status.HasField("user")
    assert status.model_version == device.engine.model_version


def test_concurrent_recommends_are_batched(stub, device) -> None:
    futures = [
        stub.Recommend.future(pb.RecommendRequest(user_id=f"u{n % 20}", k=4), timeout=20)
        for n in range(64)
    ]
    replies = [f.result() for f in futures]
    assert all(len(r.items) == 4 for r in replies)
    assert device.engine.batcher.stats()["max_batch_seen"] >= 1


def test_internal_errors_are_generic_and_logged(stub, device, monkeypatch, caplog) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(device.engine, "status", boom)
    got, details = code_of(stub.GetStatus, pb.GetStatusRequest())
    assert got == grpc.StatusCode.INTERNAL
    assert "secret" not in details and "internal error" in details
    assert any("secret internals" in (r.exc_text or "") for r in caplog.records)
    time.sleep(0)  # (the server keeps answering afterwards; the next tests use it)
