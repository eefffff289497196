"""Shared helpers of the device ranker tests (tiny synthetic data and configs)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from device_ranker.config import ModelConfig
from device_ranker.train import TrainConfig
from recsys.data import Dataset


def make_dataset(
    num_users: int = 24, num_items: int = 30, length: int = 12, seed: int = 0
) -> Dataset:
    """Users walk the catalogue in steps of +1 or +2 from a random start (learnable), each
    item at most once per user, timestamps increasing."""
    rng = np.random.default_rng(seed)
    rows = []
    t = 0
    for u in range(num_users):
        step = 1 + u % 2
        start = int(rng.integers(num_items))
        seq = [(start + step * i) % num_items for i in range(length)]
        seq = list(dict.fromkeys(seq))
        for item in seq:
            t += 1
            rows.append((f"u{u}", f"i{item}", t))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(num_items)]})
    return Dataset("synthetic", items, inter)


def tiny_model_config(num_items: int = 30, **kw) -> ModelConfig:
    base = dict(
        num_items=num_items,
        dim=8,
        max_len=6,
        num_layers=1,
        num_heads=2,
        head_hidden=16,
        dropout=0.1,
    )
    base.update(kw)
    return ModelConfig(**base)


def tiny_train_config(**kw) -> TrainConfig:
    base = dict(model=tiny_model_config(num_items=0), epochs=3, batch_size=8, patience=5, seed=0)
    base.update(kw)
    return TrainConfig(**base)
