"""DUET-style baseline generator: the same head edit, straight from raw item ids.

DUET (Lv et al., WWW'23) generates the device model's parameters in the cloud from the
device's recent item sequence. This baseline keeps everything of the adaptor except its
input: no LLM, no codebook; the recent item ids are embedded with an item-id table,
position-tagged and pooled, then the same :class:`codebook.adaptor.EditDecoder` (GRU
across the head's layers, low-rank U diag(s) V^T + bias, clipped to the same bounds)
emits the edit. Trained by the same loop with the same budget
(:mod:`recsys.workflows.adaptor_training`), so a comparison isolates the input.

Shape letters: B users, N recent items, I catalogue items, E embedding width, S device
summary width, C edit-code width.

The item table can start from the frozen ranker's item embeddings (``init_table``; the
cloud owns the ranker, so this is the strongest honest start) or at random.

Example::

    cfg = DuetConfig(num_items=1682, head_spec={"fc0": (128, 64), "fc1": (64, 128)})
    gen = DuetGenerator(cfg)
    out = gen(item_ids)                 # item_ids int64 [B, N], -1 = padding
    out.tensors["fc0.s"].shape          # [B, 8]
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from codebook.adaptor import (
    ContextEncoder,
    EditDecoder,
    EditGenerator,
    GeneratorConfig,
    masked_pool,
)
from recsys.errors import ValidationError
from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)


@config_dataclass
class DuetConfig(GeneratorConfig):
    """The DUET-style generator (decoder and shared encoder fields, with their defaults, in
    :class:`codebook.adaptor.GeneratorConfig`, as for the adaptor).

    Example::

        DuetConfig(num_items=30, head_spec={"fc0": (16, 8), "fc1": (8, 16)}, rank=2)
    """

    num_items: int = Field(kw_only=True, ge=1)  # I: item-id table size
    item_dim: int = Field(32, ge=1)  # E: pooled item width (the id table is projected to it)
    # width of the id table; None = item_dim (init_table's D if given)
    table_dim: int | None = Field(None, ge=1)


class DuetGenerator(EditGenerator):
    """Raw recent item ids (+ device summary) -> edit code -> bounded head edit.

    Args:
        cfg: :class:`DuetConfig`.
        init_table: optional [I, D] item embeddings to start the id table from (e.g. the
            frozen ranker's); a trainable copy is made and projected D -> E.

    Inputs: ``item_ids`` int64 [B, N] (most recent first, -1 = padding), ``summary``
    [B, S]. Output: :class:`codebook.adaptor.GeneratedEdit`.
    """

    def __init__(self, cfg: DuetConfig, init_table: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        table_dim = cfg.table_dim or cfg.item_dim
        if init_table is not None:
            if init_table.shape != (cfg.num_items, table_dim):
                raise ValidationError(
                    f"init_table must be [{cfg.num_items}, {table_dim}] (num_items, table_dim), "
                    f"got {tuple(init_table.shape)}"
                )
            self.item_embedding = nn.Embedding.from_pretrained(
                init_table.detach().float().clone(), freeze=False
            )
        else:
            self.item_embedding = nn.Embedding(cfg.num_items, table_dim)
            nn.init.normal_(self.item_embedding.weight, std=0.1)
        self.item_proj = nn.Linear(self.item_embedding.embedding_dim, cfg.item_dim)
        self.rank_embedding = nn.Embedding(cfg.max_items, cfg.item_dim)
        nn.init.normal_(self.rank_embedding.weight, std=0.02)
        self.context = ContextEncoder(cfg.item_dim, cfg.summary_dim, cfg.code_dim, cfg.dropout)
        self.decoder = EditDecoder(cfg.decoder_config())

    def encode(
        self,
        item_ids: torch.Tensor,
        scores: torch.Tensor | None = None,
        summary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """item_ids [B, N] -> edit code [B, C] (``scores`` is accepted and ignored, so both
        generators share one call signature)."""
        if item_ids.dim() != 2:
            raise ValidationError(f"item_ids must be [B, N], got {tuple(item_ids.shape)}")
        ids = item_ids[:, : self.cfg.max_items].to(torch.int64)  # [B, N]
        mask = ids >= 0
        if (ids >= self.cfg.num_items).any():
            raise ValidationError(f"item id outside 0..{self.cfg.num_items - 1}")
        items = F.gelu(self.item_proj(self.item_embedding(ids.clamp_min(0))))  # [B, N, E]
        items = items + self.rank_embedding.weight[: ids.shape[1]]
        return self.context(masked_pool(items, mask, None), summary)
