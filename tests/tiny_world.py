"""The tiny trained world the replay, A/B, parity and service tests share: 2-level
semantic IDs of a 30-item catalogue and an adaptor artefact (recent-item tokens, a tiny
time-split ranker, 3 prototypes) trained by the real ``train_adaptor`` in a few seconds.

``tests/`` is on ``sys.path`` (the root conftest lives here), so any test imports it::

    from tiny_world import tiny_adaptor_config, train_tiny_world
    cache = train_tiny_world(ds, tmp / "cache", bound_fraction=4.0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.prototypes import PrototypeConfig
from codebook.semantic_ids import SemanticIdMap
from device_ranker.config import ModelConfig
from device_ranker.train import TrainConfig
from recsys.data import Dataset
from recsys.workflows.adaptor_data import WindowConfig
from recsys.workflows.adaptor_training import AdaptorTrainConfig, LoopConfig, train_adaptor


def tiny_ranker_config() -> TrainConfig:
    model = ModelConfig(num_items=0, dim=8, max_len=8, num_layers=1, num_heads=2, head_hidden=16)
    return TrainConfig(model=model, epochs=2, batch_size=16, lr=3e-3, seed=0)


def tiny_adaptor_config(
    *,
    epochs: int = 2,
    windows: WindowConfig | None = None,
    prototypes: PrototypeConfig | None = None,
    **overrides: Any,
) -> AdaptorTrainConfig:
    """The tiny adaptor's training config; ``overrides`` replace top-level fields."""
    base: dict[str, Any] = dict(
        windows=windows
        or WindowConfig(window=3, stride=2, min_history=3, input_items=5, summary_items=4),
        loop=LoopConfig(epochs=epochs, batch_size=16, lr=3e-3, patience=8, holdout_users=0.25),
        rank=2,
        bound_fraction=4.0,  # the tiny head's weights are small: let the edits show
        bias_fraction=2.0,
        token_dim=8,
        code_dim=8,
        hidden=16,
        dropout=0.0,
        token_source="recent",
        prototypes=prototypes or PrototypeConfig(num_prototypes=3, residual_rank=2),
        ranker=tiny_ranker_config(),
    )
    return AdaptorTrainConfig(**{**base, **overrides})


def save_tiny_ids(ds: Dataset, cache: Path) -> Path:
    """2-level semantic IDs (item mod 5, item // 5 mod 4) of ``ds``'s catalogue, with the
    item ids, where the training and the services look for them."""
    i = np.arange(ds.num_items)
    dest = cache / "artifacts" / ds.name / "codebook"
    SemanticIdMap.from_codes(
        np.stack([i % 5, (i // 5) % 4], axis=1), [5, 4], [str(x) for x in ds.items["item_id"]]
    ).save(dest)
    return dest


def train_tiny_world(ds: Dataset, cache: Path, **config: Any) -> Path:
    """Semantic IDs + the adaptor artefact of ``ds`` under ``cache`` (one torch thread);
    ``config``: :func:`tiny_adaptor_config` arguments. Returns the artefact path."""
    torch.set_num_threads(1)
    save_tiny_ids(ds, cache)
    return train_adaptor(
        tiny_adaptor_config(**config), ds, cache=cache, progress=False
    ).artifact_path
