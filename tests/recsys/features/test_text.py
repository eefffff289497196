"""Item text building, embedding with the on-disk cache, cache robustness, real MiniLM."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.features import cache as cache_mod
from recsys.features.cache import EmbeddingCache, text_key
from recsys.features.text import embed_texts, item_texts, text_columns, text_features


def test_item_texts_follow_the_template(movie_dataset) -> None:
    texts = item_texts(movie_dataset.items)
    assert texts[0] == (
        "Title: Toy Story. Year: 1995. Genres: Animation, Comedy. Plot: Toys come to life."
    )
    assert texts[1] == "Title: GoldenEye. Year: 1995. Genres: Action, Thriller."
    assert texts[2] == ""  # nothing but missing values


def test_item_texts_aliases_lists_and_other_columns() -> None:
    items = pd.DataFrame(
        {
            "item_id": ["a", "b"],
            "movie_title": ["Alien", "Brazil"],
            "class": [["Horror", "Sci-Fi"], []],
            "release_date": ["1979-05-25", " "],
            "imdb_id": ["tt0078748", "tt0088846"],
            "poster": ["http://x/1.jpg", "http://x/2.jpg"],
            "homepage": ["https://a.example", "https://b.example"],
            "description": ["In space\nno one can hear you scream", ""],
        }
    )
    labels = [label for label, _ in text_columns(items)]
    assert labels == ["Title", "Genres", "Description", "Release date"]
    texts = item_texts(items)
    assert texts[0] == (
        "Title: Alien. Genres: Horror, Sci-Fi. Description: In space no one can hear you "
        "scream. Release date: 1979-05-25."
    )
    assert texts[1] == "Title: Brazil."
    assert item_texts(items, include_other=False)[0].endswith("hear you scream.")


def test_embed_texts_zero_rows_for_empty_and_dedup(fake_encoder, tmp_path: Path) -> None:
    texts = ["alpha", "", "beta", "alpha"]
    store = EmbeddingCache(tmp_path, fake_encoder.model_id)
    matrix, stats = embed_texts(texts, fake_encoder, store, progress=False)
    assert matrix.shape == (4, fake_encoder.dim) and matrix.dtype == np.float32
    assert not matrix[1].any()
    np.testing.assert_array_equal(matrix[0], matrix[3])
    assert sorted(fake_encoder.encoded) == ["alpha", "beta"]  # duplicate encoded once
    assert (stats.items, stats.empty, stats.encoded, stats.from_cache) == (4, 1, 3, 0)
    assert stats.unique_encoded == 2


def test_second_run_comes_from_cache(fake_encoder, movie_dataset, tmp_path: Path, caplog) -> None:
    first, stats1 = text_features(movie_dataset.items, tmp_path, fake_encoder, progress=False)
    assert stats1.encoded == 3 and stats1.empty == 1
    fake_encoder.encoded.clear()
    with caplog.at_level(logging.INFO, logger="recsys.features.text"):
        second, stats2 = text_features(movie_dataset.items, tmp_path, fake_encoder, progress=False)
    assert fake_encoder.encoded == []
    assert (stats2.from_cache, stats2.encoded) == (3, 0)
    assert "3 from cache, 0 encoded, 1 without text" in caplog.text
    np.testing.assert_array_equal(first, second)
    # a changed text misses the cache, the others still hit
    items = movie_dataset.items.copy()
    items.loc[0, "plot"] = "Toys come to life when nobody looks."
    _, stats3 = text_features(items, tmp_path, fake_encoder, progress=False)
    assert (stats3.from_cache, stats3.encoded) == (2, 1)


def test_another_model_identity_misses_the_cache(
    fake_encoder, movie_dataset, tmp_path: Path
) -> None:
    text_features(movie_dataset.items, tmp_path, fake_encoder, progress=False)
    fake_encoder.model_id = "fake-encoder/v2"
    _, stats = text_features(movie_dataset.items, tmp_path, fake_encoder, progress=False)
    assert (stats.from_cache, stats.encoded) == (0, 3)
    assert len(list(tmp_path.iterdir())) == 2  # one store folder per model identity


def _only_shard(path: Path) -> Path:
    shards = list(path.glob("shard-*.npz"))
    assert len(shards) == 1
    return shards[0]


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong_shapes"])
def test_corrupt_cache_file_is_rebuilt_with_a_warning(
    damage: str, fake_encoder, movie_dataset, tmp_path: Path, caplog
) -> None:
    first, _ = text_features(movie_dataset.items, tmp_path, fake_encoder, progress=False)
    store_dir = EmbeddingCache(tmp_path, fake_encoder.model_id).path
    shard = _only_shard(store_dir)
    if damage == "garbage":
        shard.write_bytes(b"not a zip file at all")
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        np.savez(shard.open("wb"), keys=np.array(["x", "y"]), vectors=np.zeros((3, 8)))
    with caplog.at_level(logging.WARNING, logger="recsys.features.cache"):
        again, stats = text_features(movie_dataset.items, tmp_path, fake_encoder, progress=False)
    assert "unreadable" in caplog.text
    assert (stats.from_cache, stats.encoded) == (0, 3)
    np.testing.assert_allclose(again, first)
    # the rebuilt store is healthy again
    _, stats = text_features(movie_dataset.items, tmp_path, fake_encoder, progress=False)
    assert stats.encoded == 0


def test_cache_compacts_shards_and_keeps_every_entry(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cache_mod, "MAX_SHARDS", 3)
    store = EmbeddingCache(tmp_path, "m")
    for i in range(7):
        store.put([f"k{i}"], np.full((1, 4), i, dtype=np.float32))
    assert len(list(store.path.glob("shard-*.npz"))) <= 3
    fresh = EmbeddingCache(tmp_path, "m")
    got = fresh.get([f"k{i}" for i in range(7)])
    assert len(got) == 7 and got["k5"].tolist() == [5.0] * 4
    fresh.compact()
    assert len(list(store.path.glob("shard-*.npz"))) == 1
    assert not list(store.path.glob(".tmp-*"))


def test_cache_rejects_a_different_dimension(tmp_path: Path) -> None:
    from recsys.errors import ValidationError

    store = EmbeddingCache(tmp_path, "m")
    store.put(["a"], np.ones((1, 4), np.float32))
    with pytest.raises(ValidationError):
        store.put(["b"], np.ones((1, 5), np.float32))


def test_text_key_separates_model_and_text() -> None:
    assert text_key("m1", "hello") != text_key("m2", "hello")
    assert text_key("m", "ab") != text_key("ma", "b")
    assert len(text_key("m", "x")) == 64


# ---- the real model (loaded once per session) ------------------------------------------
def test_minilm_embeds_offline_and_reuses_its_cache(minilm, movie_dataset, tmp_path: Path) -> None:
    from recsys.features.text import MiniLMEncoder

    matrix, stats = text_features(movie_dataset.items, tmp_path, minilm, progress=False)
    assert matrix.shape == (4, 384)
    norms = np.linalg.norm(matrix, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 3]], 1.0, atol=1e-5)
    assert norms[2] == 0.0 and stats.empty == 1 and stats.encoded == 3
    # a new encoder instance on a warm cache does not even load the model
    cold = MiniLMEncoder()
    start = time.perf_counter()
    again, stats2 = text_features(movie_dataset.items, tmp_path, cold, progress=False)
    elapsed = time.perf_counter() - start
    assert cold._model is None
    assert (stats2.encoded, stats2.from_cache) == (0, 3)
    np.testing.assert_array_equal(matrix, again)
    assert elapsed < 2.0


def test_minilm_similar_texts_are_closer(minilm) -> None:
    vectors = minilm.encode(
        ["A space horror film with an alien", "An alien hunts the crew of a spaceship", "Tax law"]
    )
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def test_ml100k_item_texts(ml100k) -> None:
    """The prepared ml-100k items give one templated text per movie (no encoding here)."""
    from recsys.features.fuse import text_columns_of

    items = ml100k.items[["item_id", *text_columns_of(ml100k)]]
    texts = item_texts(items)
    assert len(texts) == ml100k.num_items == 1682
    assert sum(1 for t in texts if not t) <= 2  # the "unknown" placeholder movie
    toy_story = texts[int(np.flatnonzero(ml100k.item_ids == "1")[0])]
    assert toy_story.startswith("Title: Toy Story. Year: 1995. Genres: Animation, Children's")
    assert "Director: John Lasseter." in toy_story and "Plot: A little boy" in toy_story
