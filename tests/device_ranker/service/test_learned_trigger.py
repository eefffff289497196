"""``--gate-trigger learned``: the device server decides with the learned gate, on the base
head's ranks of the clicks it ranks itself (issue 15, item 3).

A hand-made gate model (one linear layer reading the rank features) is served by a real
device beside a tiny cloud; every RecordEvent's score must equal
:class:`device_ranker.learned_gate.LearnedGate` run in the test on the same history and
the base ranks the test reads back through Recommend probes (base_model=True).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from service_helpers import device_config

from device_ranker.gate import GateConfig, GateState
from device_ranker.learned_gate import FEATURES, GateModel, LearnedGate, save_gate_model
from device_ranker.ranker import Ranker
from device_ranker.service.server import start_device
from recsys.errors import NotFoundError, ValidationError
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc

GATE = GateConfig(min_history=2, min_gap=2, budget=0.5, window=3)


def _model(num_items: int) -> GateModel:
    f = len(FEATURES)
    w = np.zeros((f, 1))
    w[FEATURES.index("recent_rank"), 0] = 1.0
    w[FEATURES.index("since_rank"), 0] = 0.5
    w[FEATURES.index("shift"), 0] = 0.3
    return GateModel(
        mean=np.zeros(f),
        std=np.ones(f),
        layers=[(w, np.array([-0.2]))],
        popularity=np.linspace(0.0, 1.0, num_items),
        thresholds={0.5: 0.25},
        train_rates={0.5: 0.5},
        meta={"dataset": "synthetic"},
    )


def test_learned_trigger_scores_match_the_learned_gate(bg, artifacts, cloud, tmp_path) -> None:
    ranker = Ranker.from_checkpoint(str(artifacts[1]))
    table = ranker.model.item_table.detach().numpy()  # [I, D]
    model = _model(len(table))
    path = save_gate_model(model, tmp_path / "gate.learned_gate.npz")
    device = bg.run(
        start_device(
            device_config(artifacts, cloud.port, trigger="learned", learned_gate=str(path),
                          gate=GATE)
        )
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            local, state = LearnedGate(model, GATE, table), GateState()
            history: list[int] = []
            ranks: list[float] = []
            requests = 0
            for t, item in enumerate([1, 5, 9, 2, 14, 20, 3, 7, 11, 25, 4], start=1):
                item_id = f"i{item}"
                if history:  # the base head's rank of the click, as the device takes it
                    rec = stub.Recommend(pb.RecommendRequest(
                        user_id="L1", k=1, probe_item_ids=[item_id], base_model=True))  # fmt: skip
                    ranks.append(float(rec.probe_ranks[0]))
                else:
                    ranks.append(np.nan)  # a new user's first click: no ranking
                history.append(ranker.item_ids.index(item_id))
                res = stub.RecordEvent(
                    pb.RecordEventRequest(
                        user_id="L1", item_id=item_id, timestamp=t, wait_for_edit=True
                    )
                )
                want = local.decide(history, state, np.asarray(ranks))
                if want.request:
                    local.on_request(history, state)
                    requests += 1
                assert res.edit_requested == want.request, t
                if np.isfinite(want.score):
                    assert res.shift_score == pytest.approx(want.score, rel=1e-5, abs=1e-6), t
                assert res.threshold == pytest.approx(0.25)
            user = stub.GetStatus(pb.GetStatusRequest(user_id="L1")).user
            assert user.trigger == "learned" and requests >= 2
    finally:
        bg.run(device.stop(0))


def test_learned_trigger_errors_name_the_fix(bg, artifacts, tmp_path) -> None:
    with pytest.raises(ValueError, match="--learned-gate"):
        device_config(artifacts, trigger="learned")
    with pytest.raises(NotFoundError, match="train-gate"):
        bg.run(start_device(device_config(
            artifacts, trigger="learned", learned_gate=str(tmp_path / "none.npz"))))  # fmt: skip
    wrong = save_gate_model(_model(7), tmp_path / "wrong.npz")
    with pytest.raises(ValidationError, match="trained for 7 items"):
        bg.run(start_device(device_config(artifacts, trigger="learned", learned_gate=str(wrong))))
