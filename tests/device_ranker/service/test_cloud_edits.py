"""The device's edit requests: the summary it uplinks follows the adaptor-input contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_ranker.model import SeqRanker
from device_ranker.ranker import Ranker
from device_ranker.service.cloud_edits import device_summary
from recsys.adaptor_inputs import summary_width


@pytest.mark.parametrize("history", [[], [3], list(range(1, 14))])
def test_device_summary_is_recent_mean_then_user_state(tiny_model: SeqRanker, history) -> None:
    ranker = Ranker(tiny_model)
    k = 10
    got = np.asarray(device_summary(ranker, history, k), dtype=np.float32)  # [2D]
    dim = tiny_model.cfg.dim
    assert got.shape == (summary_width(dim),)
    table = tiny_model.item_table.detach()
    recent = history[-k:]
    pooled = table[recent].mean(0) if recent else torch.zeros(dim)  # [D]
    state = ranker.user_states([np.asarray(history, dtype=np.int64)])[0]  # [D]
    np.testing.assert_allclose(got[:dim], pooled.numpy(), atol=1e-6)
    np.testing.assert_allclose(got[dim:], state.numpy(), atol=1e-6)
