"""Cloud-side edit refinement through the AdaptationService (issue 13, services path).

A tiny trained world (tests/tiny_world.py): the cloud runs the artefact's engine with a
refiner; a request carrying the device's recent user states gets the adaptor's edit
refined on them (codebook.refine), whole and within the generator's bounds; malformed
states are INVALID_ARGUMENT; a request without states is served as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import torch
from tiny_world import train_tiny_world

from codebook.refine import RefineConfig, refine_edits
from device_ranker.ranker import Ranker
from llm_cloud.service.engine import EditRequest
from llm_cloud.service.loading import (
    ArtifactEngineConfig,
    engine_from_artifacts,
    head_from_checkpoint,
)
from llm_cloud.service.server import CloudConfig, CloudHandle, start_cloud
from recsys.data import Dataset, write_dataset
from recsys.data.registry import load_dataset
from recsys.edit_payload import decode_payload
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.serving.batching import BatchConfig

pytestmark = pytest.mark.slow

NUM_ITEMS = 30
REFINE = RefineConfig(steps=5, lr=1e-2, positions=6)


def walk(num_users: int = 30, length: int = 16) -> Dataset:
    rng = np.random.default_rng(1)
    rows = []
    for u in range(num_users):
        step, item = 1 + u % 3, int(rng.integers(NUM_ITEMS))
        seq = list(dict.fromkeys((item + step * i) % NUM_ITEMS for i in range(length)))
        rows += [(f"u{u}", f"i{it}", 100 * i + u) for i, it in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return Dataset("walk", pd.DataFrame({"item_id": [f"i{i}" for i in range(NUM_ITEMS)]}), inter)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Ranker]:
    """(adaptor artefact, the ranker it names); the dataset is beside the cache."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cloud-refine")
    ds = load_dataset(write_dataset(walk(), root / "walk"))
    art = train_tiny_world(ds, root / "cache", epochs=2)
    ckpt = torch.load(art, weights_only=False)["ranker_path"]
    return art, Ranker.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def cloud(bg, world) -> Iterator[CloudHandle]:
    art, _ = world
    cfg = ArtifactEngineConfig(adaptor_path=str(art), refine=REFINE)
    handle = bg.run(start_cloud(CloudConfig(artifacts=cfg), engine=engine_from_artifacts(cfg)))
    yield handle
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def stub(cloud) -> Iterator[cpb_grpc.AdaptationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as channel:
        yield cpb_grpc.AdaptationServiceStub(channel)


HISTORY = np.array([3, 5, 7, 9, 11, 13, 15, 17, 19], dtype=np.int64)


def inputs(ranker: Ranker, history: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(states [p, D] before the last p positions, summary [2D]) as the device makes them."""
    from recsys.adaptor_inputs import device_summary

    n = len(history)
    states = ranker.user_states([history[:j] for j in range(n - p, n)]).numpy()
    full = ranker.user_states([history])
    summary = device_summary(ranker.model.item_table.detach(), [history], full, 4)[0].numpy()
    return states, summary


def request(ranker, history=HISTORY, p=5, sent=6, dtype=cpb.STATE_DTYPE_FP32, **states_kw):
    """A GenerateEditRequest with the last ``sent`` items and ``p`` states (the earlier
    targets as earlier_item_ids)."""
    states, summary = inputs(ranker, history, p)
    ids = [f"i{i}" for i in history]
    kw = dict(
        states=states.astype("<f2" if dtype == cpb.STATE_DTYPE_FP16 else "<f4").tobytes(),
        state_dim=states.shape[1],
        dtype=dtype,
        earlier_item_ids=ids[len(ids) - p : len(ids) - sent] if p > sent else [],
    )
    kw.update(states_kw)
    return cpb.GenerateEditRequest(
        device_id="d1",
        recent_item_ids=ids[-sent:],
        summary=summary.tolist(),
        payload_dtype=cpb.PAYLOAD_DTYPE_FP32,
        recent_states=cpb.RecentStates(**kw),
    )


def test_head_from_checkpoint_is_the_device_head(world) -> None:
    art, ranker = world
    head = head_from_checkpoint(torch.load(art, weights_only=False)["ranker_path"])
    model = ranker.model
    names = model.head.layer_names()
    assert [n for n, _, _ in head.layers] == list(names)
    for (_, w, b), (w0, b0) in zip(head.layers, model.head.base_weights(), strict=True):
        assert torch.equal(w, w0) and torch.equal(b, b0)
    assert head.residual == model.head.residual
    assert torch.equal(head.item_table, model.item_table) and torch.equal(
        head.item_bias, model.item_bias
    )


def test_refined_edit_is_whole_within_bounds_and_is_codebook_refine(stub, cloud, world) -> None:
    _, ranker = world
    reply = stub.GenerateEdit(request(ranker, p=5, sent=3), timeout=30)
    assert reply.refined and not reply.HasField("prototype_ref")
    assert not reply.HasField("prototype")
    decoded = decode_payload(reply.edit_payload, spec=ranker.edit_spec())
    assert decoded.prototype_id is None
    edit = decoded.tensors
    refiner = cloud.engine.refiner
    for name in ranker.model.head.layer_names():
        if f"{name}.s" in edit:
            assert float(edit[f"{name}.s"].norm()) <= refiner.bound * (1 + 1e-5)
        if f"{name}.bias" in edit:
            assert float(edit[f"{name}.bias"].abs().max()) <= refiner.bias_bound * (1 + 1e-5)
    # the same as codebook.refine on the adaptor's edit of the same inputs
    plain = stub.GenerateEdit(
        cpb.GenerateEditRequest(
            device_id="d1",
            recent_item_ids=[f"i{i}" for i in HISTORY[-3:]],
            summary=inputs(ranker, HISTORY, 5)[1].tolist(),
            payload_dtype=cpb.PAYLOAD_DTYPE_FP32,
        ),
        timeout=30,
    )
    assert not plain.refined and plain.HasField("prototype_ref")  # no states: as before
    eng = cloud.engine
    states, summary = inputs(ranker, HISTORY, 5)
    windows = [HISTORY[-3:]]
    items, _ = eng.tokens(windows)
    from recsys.adaptor_inputs import item_codes

    with torch.no_grad():
        gen = eng.adaptor(
            torch.from_numpy(item_codes(items, eng.codes)), None, torch.from_numpy(summary[None])
        )
    st = torch.zeros(1, REFINE.positions, states.shape[1])
    st[0, :5] = torch.from_numpy(states)
    tg = torch.full((1, REFINE.positions), -1, dtype=torch.int64)
    tg[0, :5] = torch.from_numpy(HISTORY[-5:])
    want = refine_edits(
        refiner.head,
        gen.tensors,
        st,
        tg,
        REFINE,
        bound=refiner.bound,
        bias_bound=refiner.bias_bound,
    )
    for k, v in edit.items():
        np.testing.assert_allclose(v.numpy(), want[k][0].numpy(), atol=1e-5, err_msg=k)


def test_fp16_states_are_accepted(stub, world) -> None:
    _, ranker = world
    reply = stub.GenerateEdit(request(ranker, dtype=cpb.STATE_DTYPE_FP16), timeout=30)
    assert reply.refined


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (dict(dtype=cpb.STATE_DTYPE_UNSPECIFIED), "dtype"),
        (dict(state_dim=0), "state_dim"),
        (dict(state_dim=7), "width"),
        (dict(states=b"\x00" * 10), "whole"),
        (dict(states=b""), "whole"),
        (dict(states=np.full((3, 8), np.nan, "<f4").tobytes()), "NaN"),
        (dict(states=np.full((3, 8), np.inf, "<f4").tobytes()), "NaN"),
        (dict(states=np.zeros((513, 8), "<f4").tobytes()), "limit"),
        (dict(states=np.zeros((7, 8), "<f4").tobytes()), "need the 7 items"),
    ],
)
def test_malformed_states_are_invalid_argument(stub, world, change, words) -> None:
    _, ranker = world
    req = request(ranker, p=3, sent=6, **change)
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateEdit(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert words in err.value.details()


def test_unknown_earlier_item_is_not_found(stub, world) -> None:
    _, ranker = world
    req = request(ranker, p=5, sent=3)
    req.recent_states.earlier_item_ids[0] = "nope"
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateEdit(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_refinement_is_batched_and_users_independent(cloud, world) -> None:
    """One engine call refines its refining requests together; each equals its own call,
    and a request without states in the same call keeps its prototype residual."""
    _, ranker = world
    eng = cloud.engine
    reqs = []
    for n, hist in enumerate([HISTORY, HISTORY[::-1].copy(), np.arange(2, 12)]):
        states, summary = inputs(ranker, hist, 4)
        reqs.append(
            EditRequest(f"d{n}", hist, summary, "fp32", states=states, targets=hist[-4:].copy())
        )
    reqs.append(EditRequest("d9", HISTORY, inputs(ranker, HISTORY, 1)[1], "fp32"))
    together = eng.generate_edits(reqs)
    alone = [eng.generate_edits([r])[0] for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert a.refined == b.refined and a.prototype == b.prototype
        ta, tb = decode_payload(a.payload).tensors, decode_payload(b.payload).tensors
        for k in ta:
            np.testing.assert_allclose(ta[k].numpy(), tb[k].numpy(), atol=1e-5, err_msg=k)
    assert [r.refined for r in together] == [True, True, True, False]
    assert together[0].batch_size == 4


def test_device_uplinks_its_recent_states_and_applies_the_refined_edit(
    bg, cloud, world, monkeypatch
) -> None:
    """A device server with ``uplink_states`` sends the states before its last P
    positions (from its ring buffer where a Recommend computed them, the rest in one
    pass; both equal the ranker's states of the prefixes) and the items beyond its uplink
    window; the cloud's refined edit is applied whole."""
    from device_ranker.gate import GateConfig
    from device_ranker.service.config import CloudLinkConfig, DeviceConfig
    from device_ranker.service.server import start_device
    from recsys.rpc.device.v1 import recommendation_pb2 as pb
    from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc

    art, ranker = world
    seen: list[EditRequest] = []
    generate = cloud.engine.generate_edits

    def spy(requests):
        seen.extend(requests)
        return generate(requests)

    monkeypatch.setattr(cloud.servicer.batcher, "fn", spy)
    cfg = DeviceConfig(
        checkpoint=str(torch.load(art, weights_only=False)["ranker_path"]),
        seed_histories="none",
        rank_batch=BatchConfig(max_batch=1, max_wait_ms=0.0),
        trigger="timer",
        gate=GateConfig(budget=1 / 3, min_history=4, min_gap=1),
        cloud=CloudLinkConfig(
            target=f"127.0.0.1:{cloud.port}", deadline_s=30.0, recent_items=3,
            summary_items=4, payload_dtype="fp32", uplink_states=REFINE.positions,
            state_dtype="fp32",
        ),
    )  # fmt: skip
    device = bg.run(start_device(cfg))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            replies = []
            for n, item in enumerate(HISTORY.tolist()):
                if n % 2:  # some positions' states come from a Recommend's ranking pass
                    stub.Recommend(pb.RecommendRequest(user_id="dev", k=1), timeout=30)
                replies.append(
                    stub.RecordEvent(
                        pb.RecordEventRequest(
                            user_id="dev", item_id=f"i{item}", timestamp=n + 1, wait_for_edit=True
                        ),
                        timeout=60,
                    )
                )
            status = stub.GetStatus(pb.GetStatusRequest(user_id="dev"), timeout=10).user
    finally:
        bg.run(device.stop(0))
    applied = [r for r in replies if r.outcome == pb.EDIT_OUTCOME_APPLIED]
    assert len(applied) >= 2 and all(r.cost.prototype_bytes == 0 for r in applied)
    assert all(r.cost.device_states_us > 0 for r in applied)
    assert status.edit.prototype_id == 0 and status.edit.edit_id >= 1
    mine = [r for r in seen if r.device_id == "dev"]
    assert len(mine) == len(applied)
    for r in mine:
        assert len(r.history) == 3  # the uplink window; earlier targets came separately
        hist = HISTORY[: HISTORY.tolist().index(int(r.history[-1])) + 1]
        p = min(REFINE.positions, len(hist) - 1)
        want = ranker.user_states([hist[:j] for j in range(len(hist) - p, len(hist))]).numpy()
        np.testing.assert_allclose(r.states, want, atol=1e-5)
        np.testing.assert_array_equal(r.targets, hist[-p:])
