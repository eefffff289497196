"""Fixtures for the codebook tests: small synthetic item vectors with cluster structure,
and a tiny canonical dataset with a feature matrix (no text, so no MiniLM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.data.canonical import Dataset, write_dataset


def clustered(num_items: int = 240, dim: int = 16, clusters: int = 12, seed: int = 0) -> np.ndarray:
    """float32 [I, D]: unit vectors around ``clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, num_items)] + 0.3 * rng.normal(size=(num_items, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@pytest.fixture
def vectors() -> np.ndarray:
    """[240, 16] clustered unit vectors."""
    return clustered()


@pytest.fixture
def make_vectors():
    """The :func:`clustered` factory, for tests that need other sizes."""
    return clustered


@pytest.fixture
def tiny_dataset_dir(tmp_path: Path) -> Path:
    """A canonical dataset directory: 60 items with an ``image`` matrix [60, 12], 5 users."""
    rng = np.random.default_rng(1)
    num_items = 60
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(num_items)]})
    n = 300
    inter = pd.DataFrame(
        {
            "user_id": [f"u{k % 5}" for k in range(n)],
            "item_id": [f"i{int(v)}" for v in rng.integers(0, num_items, n)],
            "timestamp": np.arange(n),
        }
    )
    image = clustered(num_items, 12, 6, seed=2) * 20.0
    ds = Dataset("tiny", items, inter, features={"image": image}, info={"text_columns": []})
    return write_dataset(ds, tmp_path / "tiny")
