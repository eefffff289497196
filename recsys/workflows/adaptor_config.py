"""Configuration of ``recsys train adaptor``: the loop and everything the artefact records.

Every default was chosen on held-out TRAINING users (never on the replay period); the
whole config is saved in the artefact (:meth:`AdaptorTrainConfig.to_dict`) and read back
with :func:`config_from_dict`, so the replay and the services use what training used.

Example::

    cfg = AdaptorTrainConfig(rank=8, loop=LoopConfig(epochs=20))
    config_from_dict(cfg.to_dict()) == cfg   # True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, field
from typing import Any, Literal

from codebook.prototypes import PrototypeConfig
from device_ranker.train import TrainConfig
from recsys.validation import Field, config_dataclass
from recsys.workflows.adaptor_data import WindowConfig


@config_dataclass
class LoopConfig:
    """Optimisation of a generator (identical for the adaptor and DUET)."""

    epochs: int = Field(40, ge=1)  # upper bound; early stopping ends sooner
    batch_size: int = Field(128, ge=1)  # request windows per step
    lr: float = Field(1e-3, gt=0)  # AdamW
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, gt=0)  # max global gradient norm
    patience: int = Field(5, ge=1)  # epochs without a lower held-out loss before stopping
    holdout_users: float = Field(0.1, gt=0, lt=1)  # share of training users for early stopping
    mask_seen: bool = True  # exclude already-seen items from the softmax (as evaluation does)
    seed: int = 0
    max_minutes: float | None = Field(None, gt=0)  # wall-time budget per generator


@config_dataclass
class AdaptorTrainConfig:
    """Everything ``recsys train adaptor`` trains (defaults: chosen on held-out training users).

    Example::

        AdaptorTrainConfig(rank=8, loop=LoopConfig(epochs=20))
    """

    quantile: float = Field(0.8, gt=0, lt=1)  # time split: training period before this quantile
    windows: WindowConfig = field(default_factory=WindowConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    rank: int = Field(8, ge=1)  # R of every generated layer edit
    bound_fraction: float = Field(0.5, gt=0)  # device ||dW||_F bound = this x min_l ||W_l||_F
    bias_fraction: float = Field(1.0, gt=0)  # device |db| bound = this x max_l max|b_l|
    clip_fraction: float = Field(0.95, gt=0, le=1)  # generators clip to this share of the bounds
    token_dim: int = Field(32, ge=1)  # E
    code_dim: int = Field(64, ge=1)  # C: edit code (prototypes cluster it)
    hidden: int = Field(128, ge=1)  # G: decoder GRU width
    dropout: float = Field(0.1, ge=0, lt=1)
    # "auto": "lm" if the LM directory holds a trained LM, else "recent"; "none": no
    # tokens, the adaptor reads the device summary only (needs device_summary)
    token_source: Literal["auto", "recent", "lm", "none"] = "auto"
    lm_backend: str = "transformers"  # llm_cloud backend for token_source "lm"
    duet_init_from_ranker: bool = True  # DUET's id table starts from the ranker's item table
    device_summary: bool = True  # feed the device summary [B, 2D] to both generators
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    ranker: TrainConfig = field(default_factory=TrainConfig)  # used only if it must be trained
    seed: int = 0

    def __post_init__(self) -> None:
        if self.token_source == "none" and not self.device_summary:
            raise ValueError(
                "token_source 'none' with device_summary=False leaves the adaptor no input "
                "at all; keep the device summary or choose another token source"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_from_dict(data: Mapping[str, Any]) -> AdaptorTrainConfig:
    """Inverse of :meth:`AdaptorTrainConfig.to_dict` (artefacts saved before a field was
    added load with that field's default)."""
    d = dict(data)
    d["windows"] = WindowConfig(**d["windows"])
    d["loop"] = LoopConfig(**d["loop"])
    d["prototypes"] = PrototypeConfig(**d["prototypes"])
    d["ranker"] = TrainConfig.from_dict(d["ranker"])
    return AdaptorTrainConfig(**d)


__all__ = ["AdaptorTrainConfig", "LoopConfig", "config_from_dict"]
