"""Ranker top-K (seen items excluded), batch path, and export parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from device_ranker.edits import random_edit
from device_ranker.export import ExportedRanker
from device_ranker.model import SeqRanker
from device_ranker.ranker import Ranker
from recsys.errors import ValidationError

HISTORIES = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10, 11], [29]]


def test_top_k_excludes_seen_items(tiny_model: SeqRanker) -> None:
    ranker = Ranker(tiny_model)
    seen = list(range(0, 30, 2))
    rec = ranker.recommend(seen, k=20)
    assert len(rec.items) == 15  # only 15 unseen items exist
    assert not set(rec.items.tolist()) & set(seen)
    assert torch.all(rec.scores[:-1] >= rec.scores[1:])
    raw = ranker.scores([seen])[0]
    unseen = torch.tensor([i for i in range(30) if i not in seen])
    assert rec.items[0] == unseen[raw[unseen].argmax()]
    rec_all = ranker.recommend(seen, k=5, exclude_seen=False)
    assert rec_all.items.tolist() == raw.topk(5).indices.tolist()


def test_exclude_and_candidates(tiny_model: SeqRanker) -> None:
    ranker = Ranker(tiny_model, item_ids=[f"i{i}" for i in range(30)])
    rec = ranker.recommend([1, 2], k=10, candidates=[2, 3, 4, 5], exclude=[5])
    assert set(rec.items.tolist()) == {3, 4}
    assert rec.item_ids == [f"i{i}" for i in rec.items.tolist()]
    with pytest.raises(ValidationError, match="outside"):
        ranker.recommend([30], k=3)
    with pytest.raises(ValidationError, match="k must be"):
        ranker.recommend([1], k=0)


def test_batch_path_matches_single_user(tiny_model: SeqRanker) -> None:
    ranker = Ranker(tiny_model)
    items, scores = ranker.recommend_batch(HISTORIES, k=5)
    assert items.shape == scores.shape == (4, 5)
    for b, h in enumerate(HISTORIES):
        rec = ranker.recommend(h, k=5)
        assert rec.items.tolist() == items[b].tolist()
        torch.testing.assert_close(rec.scores, scores[b])
        assert not set(items[b].tolist()) & set(h)


def test_export_save_load_run_matches_eager(tiny_model: SeqRanker, tmp_path: Path) -> None:
    ranker = Ranker(tiny_model)
    path = ranker.export(tmp_path / "export")
    served = ExportedRanker.load(path)
    torch.testing.assert_close(
        served.scores(HISTORIES), ranker.scores(HISTORIES), atol=1e-5, rtol=1e-5
    )
    edit = random_edit(
        tiny_model.head, rank=2, scale=0.01, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        served.scores(HISTORIES, edit=edit),
        ranker.scores(HISTORIES, edit=edit),
        atol=1e-5,
        rtol=1e-5,
    )
    items, _ = served.recommend_batch(HISTORIES, k=5)
    assert items.tolist() == ranker.recommend_batch(HISTORIES, k=5)[0].tolist()
    one = served.scores([[3, 4]])  # dynamic batch size
    assert one.shape == (1, 30)


def test_export_missing_program_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"serving\.pt2"):
        ExportedRanker.load(tmp_path)
