"""Configuration of the device ranker model (a small dataclass, validated on construction).

Shape letters used across ``device_ranker``: B users in a batch, T history positions
(the most recent ``max_len`` events), D model width, H head hidden width, I catalogue
items, K top-K, r edit rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from recsys.errors import ValidationError

ENCODERS = ("sasrec", "attn_pool")


@dataclass(frozen=True)
class IdFeatureConfig:
    """An extra id feature aligned with the item history (the extension point for codes).

    Each history position carries one id of this feature (for semantic codes: the item's
    code at one codebook level, so a 3-level codebook is three features). Its embedding
    is added to the item embedding at that position before the encoder. Scoring still
    uses the item table only, so adding features does not change the head or the edit
    format.

    Example::

        IdFeatureConfig(name="code_l0", num_embeddings=256)
    """

    name: str
    num_embeddings: int

    def __post_init__(self) -> None:
        if not self.name or self.name == "item":
            raise ValidationError(
                f"extra feature name must be non-empty and not 'item', got {self.name!r}"
            )
        if self.num_embeddings < 1:
            raise ValidationError(
                f"feature {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`device_ranker.model.SeqRanker`.

    Defaults are the ones measured on ml-100k leave-one-out (see ``device_ranker.train``).

    Example::

        cfg = ModelConfig(num_items=1682)
        cfg.head_dims   # (64, 128, 64): D -> H -> D
    """

    num_items: int  # I: size of the item table (item index 0..I-1); 0 = set by train()
    dim: int = 64  # D: embedding / encoder / query width
    max_len: int = 50  # T: most recent events the encoder reads (ml-100k median history ~65)
    encoder: str = "sasrec"  # "sasrec" (causal self-attention) or "attn_pool" (DIN-style pooling)
    num_layers: int = 2  # transformer blocks (sasrec only)
    num_heads: int = 2  # attention heads; dim must be divisible by it
    dropout: float = 0.2  # embedding / attention / FFN dropout during training (ml-100k is small)
    head_hidden: int = 128  # H: hidden width of the editable MLP head
    head_residual: bool = True  # query = state + MLP(state): the base head starts near identity
    item_bias: bool = True  # learned per-item score bias (captures popularity)
    extra_features: tuple[IdFeatureConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_items < 0:
            raise ValidationError(
                f"num_items must be >= 0 (0: filled in by train), got {self.num_items}"
            )
        if self.dim < 1 or self.max_len < 1 or self.head_hidden < 1:
            raise ValidationError(
                f"dim, max_len, head_hidden must be >= 1, got {self.dim}, {self.max_len}, {self.head_hidden}"
            )
        if self.encoder not in ENCODERS:
            raise ValidationError(f"unknown encoder {self.encoder!r}; choose one of {ENCODERS}")
        if self.dim % self.num_heads:
            raise ValidationError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValidationError(f"dropout must be in [0, 1), got {self.dropout}")
        names = [f.name for f in self.extra_features]
        if len(set(names)) != len(names):
            raise ValidationError(f"duplicate extra feature names in {names}")

    @property
    def head_dims(self) -> tuple[int, int, int]:
        """(in, hidden, out) widths of the head: D -> H -> D."""
        return (self.dim, self.head_hidden, self.dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data["extra_features"] = tuple(IdFeatureConfig(**f) for f in data.get("extra_features", ()))
        return cls(**data)
