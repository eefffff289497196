"""The adaptor: a hypernetwork from codebook tokens to a bounded edit of the ranker head.

Runs in the cloud only (trained there with back-propagation; at serving time one forward
pass per request). It never imports the device side: it is given the head as a plain
spec ``{"fc0": (out, in), "fc1": (out, in)}`` (layers in forward order) and returns
plain tensors in the flat edit format that ``device_ranker.edits.HeadEdit.from_flat``
reads, with a leading batch dimension.

Shape letters: B users, N generated items per user, L+1 semantic-ID levels, E token
embedding width, S device summary width, C edit-code width, G GRU width, R edit rank;
per head layer ``out`` x ``in``.

::

    codes [B, N, L+1] (-1 = padding)  --per-level embeddings, concat, project-->  [B, N, E]
      + rank embedding (position in the list: best first / most recent first)
      --pool over N (softmax of the LM scores when given, else uniform)-->        [B, E]
    summary [B, S] (the device's compact summary)  --linear-->                    [B, E]
    concat --MLP + LayerNorm-->  code c [B, C]     (the "edit code" prototypes cluster)

    EditDecoder: a GRU cell runs ACROSS the head's layers; the input at layer l is
    [c, layer embedding_l, projection of layer l-1's generated edit], so each layer's
    edit depends on the previous layer's (cross-layer transfer, as in Persona):
      h_l = GRU(x_l, h_{l-1})  -> u [B, out, R], s [B, R], v [B, in, R], bias [B, out]

Bounds: u and v have unit-norm columns and the whole layer edit is soft-clipped so that
``||U diag(s) V^T||_F < max_weight_norm`` (the exact norm, from R x R Gram matrices,
scaled by ``bound * tanh(norm / bound) / norm``) and ``|bias| < max_bias_abs``
(``bound * tanh(x / bound)``), the same two quantities
``device_ranker.edits.EditBounds`` checks on the device. Everything is differentiable.
At initialisation s and bias are exactly 0: the first edit is the identity.

Example::

    cfg = AdaptorConfig(vocab_sizes=(64, 64, 64, 3), head_spec=(("fc0", 128, 64),
                        ("fc1", 64, 128)), summary_dim=128, rank=8)
    adaptor = Adaptor(cfg)
    out = adaptor(codes, scores=None, summary=summary)     # codes [B, N, 4], summary [B, 128]
    out.code.shape, out.tensors["fc0.u"].shape             # [B, 64], [B, 128, 8]
    flat_for_user_0 = unbatch(out.tensors, 0)              # {"fc0.u": [128, 8], ...}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Self

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator
from torch import nn

from recsys.errors import ValidationError
from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)

HeadSpec = tuple[tuple[str, int, int], ...]  # (layer name, out, in) in forward order
# tanh saturates to exactly 1.0 in float32, and an fp32 bound can round above its float64
# value: shrink by 2^-20 (well above fp32 rounding) so outputs stay strictly inside
_STRICT = 1.0 - 2.0**-20


def head_spec(spec: Mapping[str, tuple[int, int]] | Sequence[Sequence[Any]]) -> HeadSpec:
    """Normalise ``{"fc0": (out, in), ...}`` or ``[("fc0", out, in), ...]`` to a tuple."""
    items = spec.items() if isinstance(spec, Mapping) else [(s[0], (s[1], s[2])) for s in spec]
    out = tuple((str(n), int(o), int(i)) for n, (o, i) in items)
    if not out:
        raise ValidationError("head spec is empty; expected {'fc0': (out, in), ...}")
    for name, o, i in out:
        if o < 1 or i < 1:
            raise ValidationError(f"head layer {name!r}: bad shape ({o}, {i})")
    if len({n for n, _, _ in out}) != len(out):
        raise ValidationError(f"duplicate layer names in head spec {out}")
    return out


# a head spec as written anywhere ({"fc0": (out, in)}, lists from JSON) -> HeadSpec
HeadSpecField = Annotated[HeadSpec, BeforeValidator(head_spec)]


@config_dataclass
class DecoderConfig:
    """The cross-layer GRU decoder shared by the adaptor and the DUET-style baseline.

    Example::

        DecoderConfig(head_spec=(("fc0", 128, 64), ("fc1", 64, 128)), rank=8)
    """

    head_spec: HeadSpecField
    code_dim: int = Field(64, ge=1)  # C: the edit code (what prototypes cluster)
    hidden: int = Field(128, ge=1)  # G: GRU state carried from layer to layer
    rank: int = Field(8, ge=1)  # R: low-rank edit rank per layer (payload grows linearly)
    # bound on ||dW||_F per layer (set from the head's norms)
    max_weight_norm: float = Field(2.0, gt=0)
    max_bias_abs: float = Field(0.1, gt=0)  # bound on every |db| element (from the biases)
    edit_bias: bool = True  # also generate bias deltas

    def __post_init__(self) -> None:
        limit = min(min(o, i) for _, o, i in self.head_spec)
        if self.rank > limit:
            raise ValueError(f"rank must be in 1..{limit} for this head, got {self.rank}")


def lowrank_norm(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact ``||U diag(s) V^T||_F`` without forming the matrix.

    ``||U S V^T||_F^2 = sum_ij s_i s_j (U^T U)_ij (V^T V)_ij``.

    Args:
        u: [B, out, R]; s: [B, R]; v: [B, in, R].

    Returns:
        [B] norms.
    """
    gu = torch.bmm(u.transpose(1, 2), u)  # [B, R, R]
    gv = torch.bmm(v.transpose(1, 2), v)  # [B, R, R]
    sq = torch.einsum("bi,bij,bj->b", s, gu * gv, s)  # [B]
    return sq.clamp_min(1e-12).sqrt()  # clamp: finite gradient at s = 0 (the initial edit)


def soft_clip_scale(norm: torch.Tensor, bound: float) -> torch.Tensor:
    """Factor ``bound * tanh(norm / bound) / norm`` (-> 1 for small norms, keeps the result
    strictly below ``bound``). [B] -> [B]."""
    safe = norm.clamp_min(1e-12)
    scale = _STRICT * bound * torch.tanh(safe / bound) / safe
    return torch.where(norm > 1e-12, scale, torch.ones_like(norm))


@dataclass
class GeneratedEdit:
    """What a generator returns for B users.

    Attributes:
        code: [B, C] the edit code (prototypes cluster these).
        tensors: flat edit with a batch dim: ``"fc0.u"`` [B, out, R], ``"fc0.s"`` [B, R],
            ``"fc0.v"`` [B, in, R], ``"fc0.bias"`` [B, out], per layer.
    """

    code: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def detach(self) -> GeneratedEdit:
        return GeneratedEdit(self.code.detach(), {k: v.detach() for k, v in self.tensors.items()})


def unbatch(tensors: Mapping[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Row ``b`` of a batched flat edit: ``{"fc0.u": [out, R], ...}`` (HeadEdit.from_flat input)."""
    return {k: v[b] for k, v in tensors.items()}


class EditDecoder(nn.Module):
    """Edit code [B, C] -> bounded low-rank edit of every head layer (GRU across layers).

    Example::

        dec = EditDecoder(DecoderConfig(head_spec=(("fc0", 16, 8), ("fc1", 8, 16)), rank=2))
        out = dec(torch.randn(3, 64))          # {"fc0.u": [3, 16, 2], ..., "fc1.bias": [3, 8]}
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g, c, r = cfg.hidden, cfg.code_dim, cfg.rank
        self.sizes = [o * r + i * r + r + (o if cfg.edit_bias else 0) for _, o, i in cfg.head_spec]
        self.init_state = nn.Linear(c, g)
        self.layer_embedding = nn.Embedding(len(cfg.head_spec), g)
        self.gru = nn.GRUCell(c + 2 * g, g)
        self.out = nn.ModuleList(nn.Linear(g, n) for n in self.sizes)
        self.prev = nn.ModuleList(nn.Linear(n, g) for n in self.sizes)
        with torch.no_grad():
            for lin, (_, o, i) in zip(self.out, cfg.head_spec, strict=True):
                # s and bias start at exactly 0 (identity edit); u, v start random
                lin.weight[o * r + i * r :].zero_()
                lin.bias[o * r + i * r :].zero_()

    def forward(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """code [B, C] -> flat batched edit (see :class:`GeneratedEdit`)."""
        if code.dim() != 2 or code.shape[1] != self.cfg.code_dim:
            raise ValidationError(
                f"edit code must be [B, {self.cfg.code_dim}], got {tuple(code.shape)}"
            )
        cfg, r = self.cfg, self.cfg.rank
        b = code.shape[0]
        h = torch.tanh(self.init_state(code))  # [B, G]
        prev = torch.zeros_like(h)  # [B, G] summary of the previous layer's edit
        out: dict[str, torch.Tensor] = {}
        for idx, (name, o, i) in enumerate(cfg.head_spec):
            emb = self.layer_embedding.weight[idx].expand(b, -1)  # [B, G]
            h = self.gru(torch.cat([code, emb, prev], dim=1), h)  # [B, G]
            raw = self.out[idx](h)  # [B, size_l]
            prev = torch.tanh(self.prev[idx](raw))  # conditions the next layer
            u = F.normalize(raw[:, : o * r].view(b, o, r), dim=1)  # [B, out, R] unit columns
            v = F.normalize(raw[:, o * r : o * r + i * r].view(b, i, r), dim=1)  # [B, in, R]
            s = cfg.max_weight_norm * raw[:, o * r + i * r : o * r + i * r + r]  # [B, R]
            s = s * soft_clip_scale(lowrank_norm(u, s, v), cfg.max_weight_norm).unsqueeze(1)
            out[f"{name}.u"], out[f"{name}.s"], out[f"{name}.v"] = u, s, v
            if cfg.edit_bias:
                braw = raw[:, o * r + i * r + r :]  # [B, out]
                out[f"{name}.bias"] = (
                    _STRICT * cfg.max_bias_abs * torch.tanh(braw / cfg.max_bias_abs)
                )
        return out


@config_dataclass
class GeneratorConfig(DecoderConfig):
    """Base of the generator configs (:class:`AdaptorConfig`, ``codebook.duet.DuetConfig``):
    the decoder's fields plus the encoder settings both generators have.

    ``to_dict`` / ``from_dict`` round-trip through JSON (lists become tuples again), and
    dicts saved by earlier versions load: a field added since takes its default.
    """

    summary_dim: int = Field(0, ge=0)  # S: width of the device summary (0 = no summary)
    max_items: int = Field(20, ge=1)  # N: items read per user (longer lists are cut)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # on the pooled inputs during training

    def decoder_config(self) -> DecoderConfig:
        """The :class:`DecoderConfig` part of this config."""
        return DecoderConfig(**{f.name: getattr(self, f.name) for f in fields(DecoderConfig)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return cls(**data)


@config_dataclass
class AdaptorConfig(GeneratorConfig):
    """The adaptor: token encoder + :class:`EditDecoder` (decoder and shared encoder fields
    in :class:`GeneratorConfig`).

    Example::

        AdaptorConfig(vocab_sizes=(64, 64, 64, 3), head_spec=(("fc0", 128, 64),
                      ("fc1", 64, 128)), summary_dim=128)
    """

    # codes per semantic-ID level (SemanticIdMap.vocab_sizes)
    vocab_sizes: tuple[Annotated[int, Field(ge=1)], ...] = Field(kw_only=True, min_length=1)
    token_dim: int = Field(32, ge=1)  # E: embedding width per code and per item
    score_weighting: bool = True  # pool items with softmax(scores) when scores are given


class ContextEncoder(nn.Module):
    """Shared tail of every generator's encoder: pooled items [B, E] (+ summary [B, S])
    -> edit code [B, C]."""

    def __init__(self, item_dim: int, summary_dim: int, code_dim: int, dropout: float) -> None:
        super().__init__()
        self.summary = nn.Linear(summary_dim, item_dim) if summary_dim else None
        width = item_dim * (2 if summary_dim else 1)
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(width, 2 * code_dim),
            nn.GELU(),
            nn.Linear(2 * code_dim, code_dim),
        )
        self.norm = nn.LayerNorm(code_dim)

    def forward(self, pooled: torch.Tensor, summary: torch.Tensor | None) -> torch.Tensor:
        parts = [pooled]
        if self.summary is not None:
            if summary is None:
                raise ValidationError("this generator was built with summary_dim > 0; pass summary")
            parts.append(self.summary(summary))
        return self.norm(self.mlp(torch.cat(parts, dim=1)))  # [B, C]


def masked_pool(
    items: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor | None
) -> torch.Tensor:
    """Weighted mean of the valid items. items [B, N, E], mask [B, N] bool, scores [B, N] or
    None (uniform) -> [B, E] (zeros for a row without items)."""
    if scores is None:
        logits = torch.zeros(mask.shape, dtype=items.dtype, device=items.device)
    else:
        logits = scores.to(items.dtype)
    logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.softmax(logits, dim=1).nan_to_num(0.0)  # all-masked rows -> 0
    return torch.einsum("bn,bne->be", w, items)


class EditGenerator(nn.Module):
    """Shared by the generators (:class:`Adaptor`, ``codebook.duet.DuetGenerator``): each
    has its own ``encode(inputs, scores, summary) -> code [B, C]`` and an
    :class:`EditDecoder` as ``self.decoder``."""

    decoder: EditDecoder

    def encode(
        self,
        inputs: torch.Tensor,
        scores: torch.Tensor | None = None,
        summary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        """Edit code [B, C] -> flat batched edit (used for prototype codes too)."""
        return self.decoder(code)

    def forward(
        self,
        inputs: torch.Tensor,
        scores: torch.Tensor | None = None,
        summary: torch.Tensor | None = None,
    ) -> GeneratedEdit:
        code = self.encode(inputs, scores, summary)
        return GeneratedEdit(code=code, tensors=self.decode(code))


class Adaptor(EditGenerator):
    """Codebook tokens (+ device summary) -> edit code -> bounded head edit.

    Args:
        cfg: :class:`AdaptorConfig`.

    Inputs:
        codes: int64 [B, N, L+1], each row an item's semantic ID (per-level codes as in
            ``SemanticIdMap.codes``), best / most recent first; -1 rows are padding.
        scores: optional [B, N] LM scores (log-probs); used for pooling weights.
        summary: [B, S] device summary (required when ``summary_dim`` > 0, ignored at 0).

    Output: :class:`GeneratedEdit` (code [B, C], flat tensors with a batch dim).

    Example::

        cfg = AdaptorConfig(vocab_sizes=(8, 8, 2), head_spec={"fc0": (16, 8), "fc1": (8, 16)},
                            rank=2)
        out = Adaptor(cfg)(torch.randint(0, 2, (3, 5, 3)))
        out.tensors["fc1.v"].shape        # torch.Size([3, 16, 2])
    """

    def __init__(self, cfg: AdaptorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.vocab_sizes)
        offsets = torch.tensor([0, *cfg.vocab_sizes[:-1]]).cumsum(0)
        self.register_buffer("level_offsets", offsets, persistent=False)  # [L+1]
        self.register_buffer("level_sizes", torch.tensor(cfg.vocab_sizes), persistent=False)
        self.code_embedding = nn.Embedding(sum(cfg.vocab_sizes), cfg.token_dim)
        nn.init.normal_(self.code_embedding.weight, std=0.1)
        self.item_proj = nn.Linear(levels * cfg.token_dim, cfg.token_dim)
        self.rank_embedding = nn.Embedding(cfg.max_items, cfg.token_dim)
        nn.init.normal_(self.rank_embedding.weight, std=0.02)
        self.context = ContextEncoder(cfg.token_dim, cfg.summary_dim, cfg.code_dim, cfg.dropout)
        self.decoder = EditDecoder(cfg.decoder_config())

    def encode(
        self,
        codes: torch.Tensor,
        scores: torch.Tensor | None = None,
        summary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inputs -> edit code [B, C]."""
        cfg = self.cfg
        if codes.dim() != 3 or codes.shape[2] != len(cfg.vocab_sizes):
            raise ValidationError(
                f"codes must be [B, N, {len(cfg.vocab_sizes)}] semantic IDs, got {tuple(codes.shape)}"
            )
        codes = codes[:, : cfg.max_items].to(torch.int64)  # [B, N, L+1]
        mask = (codes >= 0).all(dim=2)  # [B, N]
        if ((codes >= self.level_sizes) & mask.unsqueeze(2)).any():
            raise ValidationError(f"a code is outside its level's range {cfg.vocab_sizes}")
        idx = codes.clamp_min(0) + self.level_offsets  # [B, N, L+1] vocabulary positions
        emb = self.code_embedding(idx)  # [B, N, L+1, E]
        b, n = codes.shape[:2]
        items = F.gelu(self.item_proj(emb.reshape(b, n, -1)))  # [B, N, E]
        items = items + self.rank_embedding.weight[:n]
        if scores is not None:
            scores = scores[:, : cfg.max_items]
            if scores.shape != mask.shape:
                raise ValidationError(
                    f"scores must be [B, N]={tuple(mask.shape)}, got {tuple(scores.shape)}"
                )
        pooled = masked_pool(items, mask, scores if cfg.score_weighting else None)  # [B, E]
        return self.context(pooled, summary)


def edit_norms(tensors: Mapping[str, torch.Tensor], spec: HeadSpec) -> dict[str, torch.Tensor]:
    """Per layer ``||dW||_F`` [B] of a batched flat low-rank edit (for reports and tests)."""
    return {
        name: lowrank_norm(tensors[f"{name}.u"], tensors[f"{name}.s"], tensors[f"{name}.v"])
        for name, _, _ in spec
        if f"{name}.u" in tensors
    }


def payload_values(spec: HeadSpec, rank: int, bias: bool = True) -> int:
    """Number of values in one rank-R edit of every layer: sum over layers of
    ``(out + in + 1) R (+ out)``."""
    return sum((o + i + 1) * rank + (o if bias else 0) for _, o, i in spec)


__all__ = [
    "Adaptor",
    "AdaptorConfig",
    "ContextEncoder",
    "DecoderConfig",
    "EditDecoder",
    "EditGenerator",
    "GeneratedEdit",
    "GeneratorConfig",
    "edit_norms",
    "head_spec",
    "lowrank_norm",
    "masked_pool",
    "payload_values",
    "soft_clip_scale",
    "unbatch",
]
