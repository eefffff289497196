"""The on-device fine-tuning baseline."""

from __future__ import annotations

import pytest
import torch

from device_ranker.finetune import UNBOUNDED, finetune_head
from device_ranker.model import SeqRanker
from device_ranker.ranker import Ranker
from recsys.errors import ValidationError


def test_finetune_returns_costs_and_changes_only_the_head(tiny_model: SeqRanker) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    history = [1, 2, 3, 4, 5, 6, 7, 8]
    res = finetune_head(tiny_model, history, steps=4, lr=0.05)
    assert res.steps == 4 and res.positions == 6  # T = 6 positions of the last T + 1 events
    assert res.wall_ms > 0 and res.flops > 0 and res.peak_bytes > 0
    assert res.losses[-1] < res.losses[0]
    for k, v in tiny_model.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k]), k
    assert set(res.edit.layers) == set(tiny_model.head.layer_names())
    assert all(le.u is None and le.dense is not None for le in res.edit.layers.values())
    ranker = Ranker(tiny_model, bounds=UNBOUNDED)
    base = ranker.scores([history])
    tuned = ranker.scores([history], edit=res.edit)
    assert not torch.equal(base, tuned)


def test_finetune_without_measurement_and_bad_input(tiny_model: SeqRanker) -> None:
    res = finetune_head(tiny_model, [3, 4], steps=1, measure=False)
    assert res.flops is None and res.peak_bytes is None and res.positions == 1
    with pytest.raises(ValidationError, match=">= 2 events"):
        finetune_head(tiny_model, [3])
