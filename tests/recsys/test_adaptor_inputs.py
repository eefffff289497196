"""recsys.adaptor_inputs: the one definition of what the adaptor reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.adaptor_inputs import (
    SUMMARY_LAYOUT,
    LMTokens,
    RecentTokens,
    check_summary,
    device_summary,
    item_codes,
    recent_items,
    summary_width,
    uplink_window,
)
from recsys.errors import ValidationError

CODES = np.arange(12).reshape(6, 2)  # [I=6, L+1=2] semantic IDs


def test_uplink_window_keeps_the_last_items_oldest_first() -> None:
    assert uplink_window([1, 2, 3, 4], 2).tolist() == [3, 4]
    assert uplink_window([1], 5).tolist() == [1]
    with pytest.raises(ValidationError, match="uplink_items"):
        uplink_window([1, 2], 0)


def test_recent_items_and_codes_are_most_recent_first_and_padded() -> None:
    items = recent_items([np.array([0, 1, 2]), np.array([5])], 2)
    assert items.tolist() == [[2, 1], [5, -1]]
    codes = item_codes(items, CODES)  # [2, 2, 2]
    assert codes[0].tolist() == [[4, 5], [2, 3]] and codes[1].tolist() == [[10, 11], [-1, -1]]
    tokens, scores = RecentTokens(2)([np.array([0, 1, 2])])
    assert scores is None and tokens.tolist() == [[2, 1]]


def test_lm_tokens_pad_short_answers() -> None:
    class Backend:
        def generate(self, histories, top_n):
            return [[(4, -0.5)] for _ in histories]

        def close(self) -> None:
            pass

    items, scores = LMTokens(Backend(), 3)([np.array([1]), np.array([2, 3])])
    assert items.tolist() == [[4, -1, -1], [4, -1, -1]]
    assert scores[:, 0].tolist() == [-0.5, -0.5] and (scores[:, 1:] == 0).all()


def test_device_summary_layout_mean_recent_embedding_then_state() -> None:
    table = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # [I, D=2]
    states = torch.tensor([[100.0, 200.0], [300.0, 400.0]])
    out = device_summary(table, [np.array([0, 1, 5]), np.array([], dtype=np.int64)], states, 2)
    assert out.shape == (2, summary_width(2)) == (2, 2 * len(SUMMARY_LAYOUT))
    assert out[0].tolist() == [(2 + 10) / 2, (3 + 11) / 2, 100.0, 200.0]  # items 1 and 5
    assert out[1].tolist() == [0.0, 0.0, 300.0, 400.0]  # empty history: zeros
    with pytest.raises(ValidationError, match="user states"):
        device_summary(table, [np.array([0])], states, 2)


def test_check_summary_names_the_layout_on_a_wrong_length_and_refuses_nan() -> None:
    assert check_summary([1, 2, 3, 4], 4).dtype == np.float32
    with pytest.raises(ValidationError, match=r"reads 4 .*user state"):
        check_summary([1, 2, 3], 4)
    with pytest.raises(ValidationError, match="NaN"):
        check_summary([1, float("nan"), 3, 4], 4)
