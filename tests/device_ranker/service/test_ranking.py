"""The device's batched ranking pass: mask, per-user edits and top-k against one-by-one."""

from __future__ import annotations

import numpy as np
import torch

from device_ranker.edits import random_edit
from device_ranker.model import SeqRanker
from device_ranker.ranker import Ranker
from device_ranker.service.ranking import RankJob, rank_batch, unrankable_mask


def _job(history, *, k=5, edit=None, exclude=None, candidates=None, probes=None) -> RankJob:
    arr = lambda v: None if v is None else np.asarray(v, dtype=np.int64)  # noqa: E731
    return RankJob(
        history=np.asarray(history, dtype=np.int64),
        state=None,
        edit=edit,
        k=k,
        exclude=arr(exclude),
        candidates=arr(candidates),
        probes=arr(probes),
    )


def test_unrankable_mask_matches_a_row_by_row_mask() -> None:
    jobs = [
        _job([1], exclude=[1, 2]),
        _job([1], candidates=[3, 4, 5], exclude=[4]),  # exclusion wins over a candidate
        _job([1]),
        _job([1], candidates=[0], exclude=[]),
    ]
    mask = unrankable_mask(jobs, 8)
    want = torch.zeros(4, 8, dtype=torch.bool)
    want[0, [1, 2]] = True
    want[1] = True
    want[1, [3, 5]] = False
    want[3] = True
    want[3, 0] = False
    assert torch.equal(mask, want)


def test_rank_batch_matches_the_ranker_per_user(tiny_model: SeqRanker) -> None:
    ranker = Ranker(tiny_model)
    gen = torch.Generator().manual_seed(0)
    edit = ranker.prepare(
        random_edit(tiny_model.head, rank=2, scale=0.3, bias=False, generator=gen)
    )
    histories = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    jobs = [
        _job(histories[0], exclude=histories[0], probes=[2, 10]),
        _job(histories[1], k=3, edit=edit, exclude=histories[1], candidates=[4, 11, 12, 13]),
        _job(histories[2], k=40, edit=edit),
    ]
    out = rank_batch(tiny_model, ranker.num_items, jobs)
    one = ranker.recommend(histories[0], k=5, edit="base")
    assert out[0].items == one.items.tolist()
    assert out[0].rankable == ranker.num_items - 3
    scores = ranker.scores(histories[:1], edit="base")[0]  # [I]
    np.testing.assert_allclose(out[0].probe_scores, scores[[2, 10]].numpy(), rtol=1e-6)
    two = ranker.recommend(histories[1], k=3, candidates=[4, 11, 12, 13], edit=edit)
    assert out[1].items == two.items.tolist()  # 4 is seen: three candidates left
    assert len(out[2].items) == ranker.num_items  # k above I: the whole catalogue
    three = ranker.recommend(histories[2], k=5, exclude_seen=False, edit=edit)
    assert out[2].items[:5] == three.items.tolist()
    np.testing.assert_allclose(out[2].scores[:5], three.scores.numpy(), rtol=1e-5)


def test_the_device_config_switches_the_faiss_preselection(artifacts) -> None:
    """`recsys serve device --ann on|off|auto` reaches the ranker the engine loads."""
    from service_helpers import device_config

    from device_ranker.config import AnnConfig
    from device_ranker.service.engine import DeviceEngine

    forced = DeviceEngine.load(device_config(artifacts, ann=AnnConfig(mode="on", nlist=4)))
    assert forced.ranker.ann_index() is not None
    auto = DeviceEngine.load(device_config(artifacts))  # a tiny catalogue: exact scoring
    assert auto.ranker.ann_config.mode == "auto" and auto.ranker.ann_index() is None
