"""A tiny synthetic world for the adaptor workflow tests: dataset, semantic IDs, ranker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from codebook.semantic_ids import SemanticIdMap
from device_ranker.config import ModelConfig
from device_ranker.train import TrainConfig
from recsys.data import Dataset


def tiny_dataset(
    num_users: int = 40, num_items: int = 30, length: int = 16, late_users: int = 10, seed: int = 0
) -> Dataset:
    """Users walk the catalogue in steps of 1, 2 or 3 (learnable from recent items); the
    last ``late_users`` start after everyone else, so a time split has new users."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        step = 1 + u % 3
        start = int(rng.integers(num_items))
        t0 = 10_000 + u if u < num_users - late_users else 10_000 + 10 * length * 10 + u
        seq = list(dict.fromkeys((start + step * i) % num_items for i in range(length)))
        rows += [(f"u{u}", f"i{item}", t0 + 10 * i) for i, item in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(num_items)]})
    return Dataset("tiny-walk", items, inter)


def tiny_ids(num_items: int = 30) -> SemanticIdMap:
    """Semantic IDs from a 2-level code (item mod 5, item // 5 mod 4) + disambiguation."""
    i = np.arange(num_items)
    return SemanticIdMap.from_codes(np.stack([i % 5, (i // 5) % 4], axis=1), [5, 4])


def tiny_ranker_config(epochs: int = 2) -> TrainConfig:
    model = ModelConfig(
        num_items=0, dim=8, max_len=8, num_layers=1, num_heads=2, head_hidden=16, dropout=0.1
    )
    return TrainConfig(model=model, epochs=epochs, batch_size=16, patience=5, lr=3e-3, seed=0)


def save_ids(ids: SemanticIdMap, cache: Path, name: str) -> Path:
    dest = cache / "artifacts" / name / "codebook"
    ids.save(dest)
    return dest
