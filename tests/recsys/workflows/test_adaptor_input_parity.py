"""Training/serving parity of the adaptor's inputs (the contract of recsys.adaptor_inputs).

One history goes (a) through the training path (``build_windows``: the tokens and the
device summary the generators are trained on) and (b) through the two real gRPC
servers: a device server PROCESS (``recsys serve device``) records the history event by
event and asks a real cloud server (in this process, so the adaptor's inputs can be
observed) for an edit. The adaptor must read the same tokens and the same summary.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from adaptor_helpers import tiny_dataset
from tiny_world import train_tiny_world

from codebook.adaptor import Adaptor
from codebook.prototypes import PrototypeConfig
from codebook.semantic_ids import SemanticIdMap
from device_ranker.ranker import Ranker
from llm_cloud.service.loading import ArtifactEngineConfig
from llm_cloud.service.server import CloudConfig, start_cloud
from recsys.data import write_dataset
from recsys.data.registry import load_dataset
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.process import ServerProcess
from recsys.workflows.adaptor_data import (
    FrozenRanker,
    WindowConfig,
    build_windows,
    resolve_token_source,
)
from recsys.workflows.adaptor_training import (
    load_artifact,
)

pytestmark = pytest.mark.slow

# the adaptor reads 8 tokens from a 6-item uplink window: the window's length shows in the
# tokens (2 paddings), so a cloud that read more of what the device sent would differ
WINDOWS = WindowConfig(
    window=3, stride=2, min_history=3, input_items=8, summary_items=4, uplink_items=6
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(canonical dataset dir, adaptor artefact) of a tiny world, recent-item tokens."""
    root = tmp_path_factory.mktemp("parity")
    ds = load_dataset(write_dataset(tiny_dataset(), root / "walk"))
    cache = root / "cache"
    prototypes = PrototypeConfig(num_prototypes=2, residual_rank=2)
    art = train_tiny_world(ds, cache, windows=WINDOWS, prototypes=prototypes)
    return root / "walk", art


def training_inputs(art_path: Path, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [N, L+1] and summary [S] of the one request window at ``len(history)``."""
    art = load_artifact(art_path)
    frozen = FrozenRanker.from_ranker(Ranker.from_checkpoint(art["ranker_path"]))
    ids = SemanticIdMap.load(art_path.parent.parent / "codebook")
    tokens = resolve_token_source("recent", ids, WINDOWS.input_items, None)
    one = WindowConfig(**{**WINDOWS.__dict__, "min_history": len(history), "stride": 10_000})
    seq = np.concatenate([history, history[:1]])  # one target after the boundary
    data = build_windows(frozen, [seq], one, tokens, progress=False)
    assert len(data) == 1 and data.scores is None
    return data.codes[0], data.summary[0].numpy()


def test_training_and_both_servers_feed_the_adaptor_the_same_inputs(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bg
) -> None:
    ds_dir, art_path = trained
    art = load_artifact(art_path)
    seen: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    encode = Adaptor.encode

    def spy(self, codes, scores=None, summary=None):
        seen.append((codes.clone(), None if scores is None else scores.clone(), summary.clone()))
        return encode(self, codes, scores, summary)

    monkeypatch.setattr(Adaptor, "encode", spy)
    torch.set_num_threads(1)
    cloud = bg.run(
        start_cloud(
            CloudConfig(
                engine="artifacts",
                artifacts=ArtifactEngineConfig(adaptor_path=str(art_path)),
            )
        )
    )
    item_ids = [f"i{n}" for n in (3, 4, 11, 12, 13, 20, 21, 22, 29)]  # 9 events, one new user
    device = ServerProcess(
        ["serve", "device", "--checkpoint", str(art["ranker_path"]), "--dataset", str(ds_dir),
         "--seed-histories", "none", "--cloud", f"127.0.0.1:{cloud.port}",
         "--cloud-deadline", "20",  # --recent-items: the default (50), more than is read
         "--summary-items", str(WINDOWS.summary_items), "--gate-trigger", "timer",
         "--gate-budget", "0.001", "--gate-min-history", "100", "--torch-threads", "1"],
        name="device", log_path=tmp_path / "device.log",
    ).start()  # fmt: skip
    try:
        device.wait_ready(timeout=120)
        with grpc.insecure_channel(device.target) as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            for t, item in enumerate(item_ids):
                stub.RecordEvent(
                    pb.RecordEventRequest(user_id="parity", item_id=item, timestamp=1000 + t),
                    timeout=30,
                )
            before = len(seen)
            reply = stub.RequestEdit(
                pb.RequestEditRequest(user_id="parity", wait_for_edit=True), timeout=60
            )
            assert reply.outcome == pb.EDIT_OUTCOME_APPLIED, device.log_tail()
    finally:
        device.stop()
        bg.run(cloud.stop(0))
    assert len(seen) == before + 1, "exactly one adaptor call serves the request"
    codes, scores, summary = seen[-1]
    ds = load_dataset(ds_dir)
    index = {str(iid): n for n, iid in enumerate(ds.items["item_id"])}
    history = np.array([index[i] for i in item_ids], dtype=np.int64)
    want_codes, want_summary = training_inputs(art_path, history)
    np.testing.assert_array_equal(codes[0].numpy(), want_codes)  # tokens: bit-exact
    assert (want_codes[WINDOWS.uplink_items :] == -1).all()  # the window's length shows
    assert scores is None
    assert summary.shape == (1, len(want_summary))
    np.testing.assert_allclose(summary[0].numpy(), want_summary, rtol=0, atol=1e-6)
    # the uplink window is what the training window read: the history is longer than it
    assert len(history) > WINDOWS.uplink_items
