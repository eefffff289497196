"""The LM token cache: a window is generated once, answers survive a new process, another
model identity never reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.errors import ValidationError
from recsys.workflows.token_cache import CachedTokens, lm_identity


class CountingSource:
    """Top-N = the window's items reversed (+ offset), scores = -rank; counts windows."""

    name = "lm"

    def __init__(self, n: int, offset: int = 0, scores: bool = True) -> None:
        self.n, self.offset, self.scores, self.calls = n, offset, scores, 0
        self.closed = False

    def __call__(self, windows):
        self.calls += len(windows)
        items = np.full((len(windows), self.n), -1, dtype=np.int64)
        for b, w in enumerate(windows):
            top = (w[::-1] + self.offset)[: self.n]
            items[b, : len(top)] = top
        scores = -np.tile(np.arange(self.n, dtype=np.float32), (len(windows), 1))
        return items, (scores if self.scores else None)

    def close(self):
        self.closed = True


WINDOWS = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8])]


def test_a_window_is_generated_once_and_read_back_in_a_new_process(tmp_path: Path) -> None:
    source = CountingSource(3)
    cached = CachedTokens(source, tmp_path, "model-a")
    items, scores = cached(WINDOWS)
    assert source.calls == 3
    assert np.array_equal(items[0], [3, 2, 1]) and np.array_equal(items[1], [4, -1, -1])
    again_items, again_scores = cached(WINDOWS[::-1])  # order does not matter
    assert source.calls == 3 and np.array_equal(again_items, items[::-1])
    assert np.array_equal(again_scores, scores[::-1])
    cached.close()
    assert source.closed

    fresh = CountingSource(3)  # a resumed run: only the new window is generated
    resumed = CachedTokens(fresh, tmp_path, "model-a")
    items2, _ = resumed([WINDOWS[1], np.array([9, 10])])
    assert fresh.calls == 1 and (resumed.hits, resumed.misses) == (1, 1)
    assert np.array_equal(items2, [[4, -1, -1], [10, 9, -1]])


def test_another_model_never_reads_the_answers(tmp_path: Path) -> None:
    CachedTokens(CountingSource(3), tmp_path, "model-a")(WINDOWS)
    other = CountingSource(3, offset=100)
    items, _ = CachedTokens(other, tmp_path, "model-b")(WINDOWS)
    assert other.calls == 3 and items[0, 0] == 103
    wider = CountingSource(2)  # another N is another key, even for the same model
    CachedTokens(wider, tmp_path, "model-a")(WINDOWS)
    assert wider.calls == 3


def test_scoreless_sources_and_ids_too_large_for_float32(tmp_path: Path) -> None:
    items, scores = CachedTokens(CountingSource(2, scores=False), tmp_path, "m")(WINDOWS)
    assert scores is not None and not scores.any() and items[2, 0] == 8
    with pytest.raises(ValidationError, match="too large for the token cache"):
        CachedTokens(CountingSource(2, offset=1 << 24), tmp_path, "big")(WINDOWS)


def test_lm_identity_follows_every_file_and_the_settings(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "recsys_lm.json").write_text("{}")
    first = lm_identity(tmp_path, "transformers", {"beam": 20})
    assert first == lm_identity(tmp_path, "transformers", {"beam": 20})
    assert first != lm_identity(tmp_path, "vllm", {"beam": 20})
    assert first != lm_identity(tmp_path, "transformers", {"beam": 10})
    (tmp_path / "model.safetensors").write_bytes(b"retrained")
    assert first != lm_identity(tmp_path, "transformers", {"beam": 20})
