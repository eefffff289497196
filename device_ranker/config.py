"""Configuration of the device ranker model (small dataclasses, validated on construction
by pydantic: :func:`recsys.validation.config_dataclass`).

Shape letters used across ``device_ranker``: B users in a batch, T history positions
(the most recent ``max_len`` events), D model width, H head hidden width, I catalogue
items, K top-K, r edit rank.
"""

from __future__ import annotations

from dataclasses import asdict, field
from typing import Any, Literal

from pydantic import Field

from recsys.validation import config_dataclass


@config_dataclass
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

    name: str = Field(min_length=1)  # not "item" (the history's own feature)
    num_embeddings: int = Field(ge=1)

    def __post_init__(self) -> None:
        if self.name == "item":
            raise ValueError("an extra feature must not be named 'item' (the item history's)")


@config_dataclass
class ModelConfig:
    """Hyper-parameters of :class:`device_ranker.model.SeqRanker`.

    Defaults are the ones measured on ml-100k leave-one-out (see ``device_ranker.train``).

    Example::

        cfg = ModelConfig(num_items=1682)
        cfg.head_dims   # (64, 128, 64): D -> H -> D
    """

    # I: size of the item table (item index 0..I-1); 0 = set by train()
    num_items: int = Field(ge=0)
    dim: int = Field(64, ge=1)  # D: embedding / encoder / query width
    # T: most recent events the encoder reads (ml-100k median history ~65)
    max_len: int = Field(50, ge=1)
    # "sasrec" (causal self-attention) or "attn_pool" (DIN-style pooling)
    encoder: Literal["sasrec", "attn_pool"] = "sasrec"
    num_layers: int = Field(2, ge=0)  # transformer blocks (sasrec only)
    num_heads: int = Field(2, ge=1)  # attention heads; dim must be divisible by it
    dropout: float = Field(0.2, ge=0.0, lt=1.0)  # embedding / attention / FFN dropout in training
    head_hidden: int = Field(128, ge=1)  # H: hidden width of the editable MLP head
    head_residual: bool = True  # query = state + MLP(state): the base head starts near identity
    item_bias: bool = True  # learned per-item score bias (captures popularity)
    extra_features: tuple[IdFeatureConfig, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        names = [f.name for f in self.extra_features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate extra feature names in {names}")

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


@config_dataclass
class AnnConfig:
    """Approximate maximum-inner-product pre-selection for large catalogues
    (:mod:`device_ranker.ann`): a faiss index over the item table (with the item bias
    folded in) returns C candidates per user, exact scores of the candidates give the
    top-K. Defaults chosen with ``recsys bench ann`` (see :mod:`device_ranker.ann`).

    Example::

        AnnConfig(mode="on", kind="hnsw")   # force on whatever the catalogue size
    """

    # "auto": on when the catalogue has at least min_items items; "on" / "off": forced
    mode: Literal["auto", "on", "off"] = "auto"
    # ann_min_items: exact scoring is cheaper at 10^4 items, the index at 10^5 (one thread,
    # per user 0.17 vs 0.50 ms and 5.7 vs 0.56 ms; per 64 users 4.9 vs 9.8 and 57 vs 20 ms);
    # the crossover between them was not measured
    min_items: int = Field(50_000, ge=1)
    # faiss IndexIVFFlat or IndexHNSWFlat. IVF measured faster at recall@10 >= 0.99 (10^6
    # items, 1 thread: 1.9 vs 2.6 ms per user, 100 vs 142 ms per 64 users), builds in 9 s
    # instead of 410 s and takes half the memory (283 vs 534 MB): results/bench_ann.txt
    kind: Literal["ivf", "hnsw"] = "ivf"
    # IVF lists; 0 = sqrt(I). At 10^5 items 4 sqrt(I) lists scanned about 20 % fewer
    # vectors for recall@10 0.99 (nprobe 64 of 1265 vs 24 of 316), but k-means costs 4x
    # more; on one thread sqrt(I) keeps the 10^6 build at 9 s
    nlist: int = Field(0, ge=0)
    # IVF lists searched per query: the smallest reaching recall@10 0.99 on the bench's
    # tuning users at 10^6 items (0.992; held-out 0.995); 24 sufficed at 10^4 and 10^5
    nprobe: int = Field(48, ge=1)
    hnsw_m: int = Field(32, ge=2)  # HNSW graph degree
    ef_construction: int = Field(40, ge=1)  # HNSW build beam
    # HNSW search beam (raised to C when C is larger): the smallest reaching 0.99 on the
    # tuning users at 10^6 items (held-out 0.989)
    ef_search: int = Field(384, ge=1)
    # C: candidates of the first search (rows left short by exclusion search again for k + seen)
    candidates: int = Field(64, ge=1)
    max_candidates: int = Field(4096, ge=1)  # cap on C; a row left with < k falls back to exact
    train_points: int = Field(100_000, ge=1)  # IVF k-means sample (points)
    seed: int = 0  # IVF k-means seed

    def active(self, num_items: int) -> bool:
        """Whether a catalogue of ``num_items`` items is ranked through the index."""
        return self.mode == "on" or (self.mode == "auto" and num_items >= self.min_items)
