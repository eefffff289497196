"""A tiny world for the replay tests: a dataset whose users walk a 30-item catalogue, its
time-split ranker, 2-level semantic IDs and an adaptor artefact (recent-item tokens,
3 prototypes) trained by the real ``train_adaptor`` workflow, all in a few seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from codebook.prototypes import PrototypeConfig
from codebook.semantic_ids import SemanticIdMap
from device_ranker.config import ModelConfig
from device_ranker.train import TrainConfig
from recsys.data import Dataset, write_dataset
from recsys.data.registry import load_dataset
from recsys.workflows.adaptor_data import WindowConfig
from recsys.workflows.adaptor_training import AdaptorTrainConfig, LoopConfig, train_adaptor

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
    i = np.arange(NUM_ITEMS)
    codes = np.stack([i % 5, (i // 5) % 4], axis=1)
    SemanticIdMap.from_codes(codes, [5, 4], [f"i{n}" for n in i]).save(  # ids: the cloud server
        cache / "artifacts" / ds.name / "codebook"
    )
    cfg = AdaptorTrainConfig(
        windows=WindowConfig(window=3, stride=2, min_history=3, input_items=5, summary_items=4),
        loop=LoopConfig(epochs=3, batch_size=16, lr=3e-3, patience=8, holdout_users=0.25),
        rank=2,
        token_dim=8,
        code_dim=8,
        hidden=16,
        dropout=0.0,
        bound_fraction=20.0,  # the tiny head's last layer starts near zero (norm ~0.1)
        bias_fraction=4.0,
        token_source="recent",
        prototypes=PrototypeConfig(num_prototypes=3, residual_rank=2),
        ranker=TrainConfig(
            model=ModelConfig(
                num_items=0, dim=8, max_len=8, num_layers=1, num_heads=2, head_hidden=16
            ),
            epochs=2,
            batch_size=16,
            lr=3e-3,
            seed=0,
        ),
    )
    train_adaptor(cfg, ds, cache=cache, progress=False)
    return World(ds=ds, root=base / "drift", cache=cache)
