"""A tiny world for the replay tests: a dataset whose users walk a 30-item catalogue, its
time-split ranker, 2-level semantic IDs and an adaptor artefact (recent-item tokens,
3 prototypes) trained by the real ``train_adaptor`` workflow, all in a few seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tiny_world import train_tiny_world

from codebook.prototypes import PrototypeConfig
from recsys.data import Dataset, write_dataset
from recsys.data.registry import load_dataset

NUM_ITEMS = 30


def drift_dataset(num_users: int = 40, late_users: int = 10, length: int = 24) -> Dataset:
    """Each user walks the catalogue with a step of 1, 2 or 3 and switches to another step
    half way (a taste shift the gate can see). Users have 18, 24 or 30 events; the last
    ``late_users`` start 16 steps later, so the replay period holds both long-standing
    and new users. Timestamps interleave users."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(num_users):
        first, second = 1 + u % 3, 1 + (u + 1) % 3
        item = int(rng.integers(NUM_ITEMS))
        late = 16 if u >= num_users - late_users else 0
        n = length if u >= num_users - late_users else length - 6 + 6 * (u % 3)
        seq = []
        for i in range(n):
            seq.append(item)
            item = (item + (first if i < n // 2 else second)) % NUM_ITEMS
        seq = list(dict.fromkeys(seq))
        rows += [(f"u{u}", f"i{it}", 100 * (i + late) + u) for i, it in enumerate(seq)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(NUM_ITEMS)]})
    return Dataset("drift", items, inter)


@dataclass
class World:
    ds: Dataset
    root: Path  # the canonical dataset directory
    cache: Path  # holds artifacts/drift/{ranker-time.pt, codebook, adaptor/adaptor.pt}


def build_world(base: Path) -> World:
    ds = load_dataset(write_dataset(drift_dataset(), base / "drift"))
    cache = base / "cache"
    train_tiny_world(
        ds,
        cache,
        epochs=3,
        bound_fraction=20.0,  # the tiny head's last layer starts near zero (norm ~0.1)
        bias_fraction=4.0,
        prototypes=PrototypeConfig(num_prototypes=3, residual_rank=2),
    )
    return World(ds=ds, root=base / "drift", cache=cache)
