"""Deployment export: a ``torch.export`` program that reads the trained weights directly.

TorchRec's ``EmbeddingCollection`` and ``KeyedJaggedTensor`` do not go through
``torch.export`` cleanly (data-dependent jagged shapes), so the export is a small
:class:`ServingModule` that holds a copy of the trained item table, position table,
encoder and item bias, looks the history up with ``F.embedding`` on right-padded ids
and runs the *same* encoder code (:func:`device_ranker.model.encode_positions`). The
head weights are **inputs** of the program, so a device feeds base or edited weights
without re-exporting: an edit stays a plain tensor addition on the device.

On-disk layout (a directory)::

    serving.pt2   torch.export program: (ids [B, T] int64, lengths [B] int64,
                  head [W0, b0, W1, b1, ...]) -> scores [B, I] (nothing excluded)
    head.pt       dict: base head weights, head dims, residual flag, max_len,
                  num_items, item_ids

Batch size is dynamic. Models with extra id features (codes) are not exported yet.

Example::

    path = export_ranker(ranker, "/tmp/ranker_export")
    served = ExportedRanker.load(path)
    items, scores = served.recommend_batch([[1, 2, 3]], k=10)   # == ranker.recommend_batch
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from device_ranker.edit_apply import PreparedEdit, prepare_edit
from device_ranker.edits import EditBounds, HeadEdit
from device_ranker.features import History, _as_int64, check_item_range, pad_histories, seen_mask
from device_ranker.head import EditableHead, head_forward
from device_ranker.model import SeqRanker, encode_positions
from recsys.errors import ValidationError

if TYPE_CHECKING:
    from device_ranker.ranker import Ranker

logger = logging.getLogger(__name__)

PROGRAM_FILE = "serving.pt2"
HEAD_FILE = "head.pt"


class ServingModule(nn.Module):
    """Dense-input twin of :class:`SeqRanker` for export.

    Inputs: ids [B, T] int64 right-padded (padding value ignored), lengths [B] int64,
    head: list of per-layer tensors [W0, b0, W1, b1, ...]. Output: scores [B, I].
    """

    def __init__(self, model: SeqRanker) -> None:
        super().__init__()
        if model.cfg.extra_features:
            raise ValidationError("export of models with extra id features is not supported yet")
        self.residual = model.head.residual
        self.register_buffer("item_table", model.item_table.detach().clone())  # [I, D]
        self.register_buffer("item_bias", model.item_bias.detach().clone())  # [I]
        self.position = copy.deepcopy(model.position)
        self.encoder = copy.deepcopy(model.encoder)
        self.eval()

    def forward(
        self, ids: torch.Tensor, lengths: torch.Tensor, head: list[torch.Tensor]
    ) -> torch.Tensor:
        t = ids.shape[1]
        valid = torch.arange(t, device=ids.device) < lengths.unsqueeze(1)  # [B, T]
        x = F.embedding(ids, self.item_table) * valid.unsqueeze(-1).to(
            self.item_table.dtype
        )  # [B, T, D]
        states = encode_positions(x, lengths, self.position, self.encoder)  # [B, T, D]
        idx = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
        state = states.gather(1, idx).squeeze(1)  # [B, D]
        weights = [(head[2 * i], head[2 * i + 1]) for i in range(len(head) // 2)]
        q = head_forward(state, weights, self.residual)  # [B, D]
        return F.linear(q, self.item_table, self.item_bias)  # [B, I]


def _flat(weights) -> list[torch.Tensor]:
    return [t for wb in weights for t in wb]


def export_ranker(ranker: Ranker, directory: str | Path) -> Path:
    """Export ``ranker`` to ``directory`` (created); returns the directory."""
    model = ranker.model
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    module = ServingModule(model)
    t = model.cfg.max_len
    ids, lengths = pad_histories([[0, 1, 2], [3]], t)
    head = [w.detach().clone() for w in _flat(model.head.base_weights())]
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(
            module,
            (ids, lengths, head),
            dynamic_shapes={"ids": {0: batch}, "lengths": {0: batch}, "head": [None] * len(head)},
        )
    torch.export.save(program, out / PROGRAM_FILE)
    torch.save(
        {
            "head_dims": list(model.head.dims),
            "residual": model.head.residual,
            "head_state": {k: v.detach().clone() for k, v in model.head.state_dict().items()},
            "max_len": t,
            "num_items": model.cfg.num_items,
            "item_ids": ranker.item_ids,
        },
        out / HEAD_FILE,
    )
    logger.info("exported ranker to %s", out)
    return out


class ExportedRanker:
    """Runs an exported program: same scores/top-K API as :class:`Ranker` (base or edit).

    Example::

        served = ExportedRanker.load("/tmp/ranker_export")
        served.scores([[1, 2, 3]])            # [1, I]
    """

    def __init__(
        self, program: torch.export.ExportedProgram, meta: dict, bounds: EditBounds | None = None
    ):
        self.program = program
        self.module = program.module()
        self.max_len = int(meta["max_len"])
        self.num_items = int(meta["num_items"])
        self.item_ids = meta.get("item_ids")
        self.head = EditableHead(meta["head_dims"], residual=bool(meta["residual"]))
        self.head.load_state_dict(meta["head_state"])
        self.head.requires_grad_(False)
        self.bounds = bounds or EditBounds()

    @classmethod
    def load(cls, directory: str | Path, bounds: EditBounds | None = None) -> ExportedRanker:
        d = Path(directory)
        if not (d / PROGRAM_FILE).is_file():
            raise ValidationError(f"{d} has no {PROGRAM_FILE}; export a ranker there first")
        meta = torch.load(d / HEAD_FILE, map_location="cpu", weights_only=True)
        return cls(torch.export.load(d / PROGRAM_FILE), meta, bounds)

    def scores(
        self, histories: Sequence[History], *, edit: HeadEdit | PreparedEdit | None = None
    ) -> torch.Tensor:
        """Raw scores [B, I] with the base head or ``edit``."""
        hs = [_as_int64(h) for h in histories]
        for h in hs:
            check_item_range(h, self.num_items, "history item index")
        if edit is None:
            weights = self.head.base_weights()
        elif isinstance(edit, PreparedEdit):
            weights = edit.weights
        else:
            weights = prepare_edit(self.head, edit, self.bounds).weights
        ids, lengths = pad_histories(hs, self.max_len)
        with torch.inference_mode():
            return self.module(ids, lengths, _flat(weights))

    def recommend_batch(
        self,
        histories: Sequence[History],
        k: int = 10,
        *,
        edit: HeadEdit | PreparedEdit | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K with seen items excluded: items [B, K], scores [B, K]."""
        from device_ranker.ranker import Ranker

        scores = self.scores(histories, edit=edit)
        return Ranker.mask_and_topk(scores, seen_mask(histories, self.num_items), k)
