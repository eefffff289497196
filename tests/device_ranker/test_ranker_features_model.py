"""KJT construction from ragged histories and forward shapes."""

from __future__ import annotations

import pytest
import torch
from ranker_helpers import tiny_model_config

from device_ranker.config import IdFeatureConfig, ModelConfig
from device_ranker.features import history_kjt, pad_histories, seen_mask
from device_ranker.model import SeqRanker
from recsys.errors import ValidationError


def test_kjt_from_ragged_histories_with_empty_and_truncation() -> None:
    kjt = history_kjt([[3, 1, 4, 1, 5], [], [9]], max_len=3)
    assert kjt.keys() == ["item"]
    assert kjt.stride() == 3
    assert kjt.lengths().tolist() == [3, 0, 1]
    assert kjt.values().tolist() == [4, 1, 5, 9]  # the most recent 3 events of user 0


def test_kjt_all_empty_and_extra_features() -> None:
    kjt = history_kjt([[], []], max_len=4)
    assert kjt.lengths().tolist() == [0, 0] and kjt.values().numel() == 0
    kjt = history_kjt([[1, 2, 3], [4]], max_len=2, extra={"code_l0": [[7, 8, 9], [5]]})
    assert kjt.keys() == ["item", "code_l0"]
    assert kjt["code_l0"].values().tolist() == [8, 9, 5]
    with pytest.raises(ValidationError, match="aligned"):
        history_kjt([[1, 2, 3]], max_len=2, extra={"code_l0": [[7]]})


def test_pad_histories_and_seen_mask() -> None:
    ids, lengths = pad_histories([[1, 2, 3], []], max_len=2)
    assert ids.tolist() == [[2, 3], [0, 0]] and lengths.tolist() == [2, 0]
    mask = seen_mask([[1, 2, 3], []], num_items=5)
    assert mask.tolist() == [[False, True, True, True, False], [False] * 5]


def test_forward_shapes(tiny_model: SeqRanker) -> None:
    b, t, d, i = 3, tiny_model.cfg.max_len, tiny_model.cfg.dim, tiny_model.cfg.num_items
    kjt = history_kjt([[1, 2, 3], [], list(range(20))], max_len=t)
    states, lengths = tiny_model.sequence_states(kjt)
    assert states.shape == (b, t, d) and lengths.tolist() == [3, 0, 6]
    assert tiny_model.user_states(kjt).shape == (b, d)
    scores = tiny_model(kjt)
    assert scores.shape == (b, i) and torch.isfinite(scores).all()


def test_state_ignores_padding_and_older_events(tiny_model: SeqRanker) -> None:
    t = tiny_model.cfg.max_len
    long = list(range(15))
    a = tiny_model(history_kjt([long, [1]], max_len=t))
    b = tiny_model(history_kjt([long[-t:]], max_len=t))
    torch.testing.assert_close(a[0], b[0])  # only the last T events matter; batchmates don't


def test_attn_pool_encoder_and_extra_features_forward() -> None:
    torch.manual_seed(0)
    cfg = tiny_model_config(encoder="attn_pool", extra_features=(IdFeatureConfig("code_l0", 4),))
    model = SeqRanker(cfg).eval()
    kjt = history_kjt([[1, 2], []], max_len=cfg.max_len, extra={"code_l0": [[0, 3], []]})
    assert model(kjt).shape == (2, cfg.num_items)
    assert "code_l0" in model.embeddings.embeddings
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"encoder": "gru"}, "encoder: Input should be .sasrec. or .attn_pool."),
        ({"dim": 10, "num_heads": 3}, "divisible"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_items": -1}, "num_items"),
    ],
)
def test_model_config_fails_fast(kw: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        tiny_model_config(**kw)
