"""Fixtures for the feature tests: a fast fake text encoder, a real MiniLM (session),
and small synthetic datasets (movie-like text, TikTok-like image + audio)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from recsys.data.canonical import Dataset


class FakeEncoder:
    """Deterministic pseudo-embeddings from a hash of the text; counts what it encodes."""

    def __init__(self, dim: int = 8, model_id: str = "fake-encoder/v1") -> None:
        self.dim = dim
        self.model_id = model_id
        self.encoded: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.encoded.extend(texts)
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).normal(size=self.dim)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32)


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 encoder, loaded once per session (a few seconds)."""
    from recsys.features.text import MiniLMEncoder

    encoder = MiniLMEncoder()
    encoder.load()
    return encoder


def _interactions(item_ids: list[str]) -> pd.DataFrame:
    n = len(item_ids)
    return pd.DataFrame(
        {"user_id": [f"u{i % 3}" for i in range(n)], "item_id": item_ids, "timestamp": np.arange(n)}
    )


@pytest.fixture
def movie_dataset() -> Dataset:
    items = pd.DataFrame(
        {
            "item_id": ["1", "2", "3", "4"],
            "title": ["Toy Story", "GoldenEye", None, "Heat"],
            "year": [1995.0, 1995.0, float("nan"), 1995.0],
            "genres": ["Animation, Comedy", "Action, Thriller", None, "Crime"],
            "plot": ["Toys come to life.", None, None, "A heist goes wrong."],
        }
    )
    return Dataset("movies", items, _interactions(list(items["item_id"])))


@pytest.fixture
def tiktok_like() -> Dataset:
    """Items without text; image [I, 16] (large scale) and audio [I, 6] (small scale),
    with some rows missing (all zeros) in each modality."""
    rng = np.random.default_rng(0)
    num_items = 12
    image = rng.normal(size=(num_items, 16)).astype(np.float32) * 50.0
    audio = rng.normal(size=(num_items, 6)).astype(np.float32) * 0.01
    image[[2, 5]] = 0.0
    audio[[5, 7, 9]] = 0.0
    items = pd.DataFrame({"item_id": [str(i) for i in range(num_items)]})
    return Dataset(
        "tiktok-mini",
        items,
        _interactions(list(items["item_id"])),
        features={"image": image, "audio": audio},
        info={"text_columns": []},
    )
