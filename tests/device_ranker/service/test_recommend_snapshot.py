"""A Recommend reports the mode and edit it ranked with: an edit that a background
request installs while the ranking pass runs shows in the next answer, never as an
"edited" answer with no edit and base-head scores (what made the client's
async-vs-blocking comparison flaky)."""

from __future__ import annotations

import grpc
import torch
from service_helpers import device_config

from device_ranker.edits import random_edit
from device_ranker.service.server import start_device
from device_ranker.service.users import EditInfo
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc


def test_an_edit_installed_during_the_pass_is_reported_by_the_next_answer(
    bg, artifacts, monkeypatch
) -> None:
    handle = bg.run(start_device(device_config(artifacts)))
    engine = handle.engine
    head = engine.ranker.model.head
    edit = random_edit(head, rank=2, scale=0.3, bias=False,
                       generator=torch.Generator().manual_seed(3))  # fmt: skip
    prepared = engine.ranker.prepare(edit)
    rank = engine.ranking.rank

    async def rank_while_an_edit_lands(st, **kw):
        out = await rank(st, **kw)  # ranked with the edit read before the pass
        st.install_edit(prepared, EditInfo(edit_id=99, source="cloud"))  # lands meanwhile
        return out

    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            stub = pb_grpc.RecommendationServiceStub(ch)
            req = pb.RecommendRequest(user_id="u1", k=5)
            base = stub.Recommend(pb.RecommendRequest(user_id="u1", k=5, base_model=True))
            monkeypatch.setattr(engine.ranking, "rank", rank_while_an_edit_lands)
            during = stub.Recommend(req, timeout=20)
            monkeypatch.setattr(engine.ranking, "rank", rank)
            after = stub.Recommend(req, timeout=20)
    finally:
        bg.run(handle.stop(0))
    assert during.mode == pb.SERVING_MODE_BASE and not during.HasField("edit")
    assert [i.score for i in during.items] == [i.score for i in base.items]
    assert after.mode == pb.SERVING_MODE_EDITED and after.edit.edit_id == 99
    assert [i.score for i in after.items] != [i.score for i in base.items]
