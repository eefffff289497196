"""``Ranker``: the inference engine used by the device service and the replay evaluator.

A thin wrapper over a trained :class:`~device_ranker.model.SeqRanker` under
``torch.inference_mode()``: full-catalogue scores, seen items excluded, top-K; the head
runs with the base weights or with an edit (active edit, or one passed per call, or one
per user in a batch). Embeddings and encoder are frozen.

Example::

    ranker = Ranker.from_checkpoint(cache_dir() / "artifacts/ml-100k/ranker.pt")
    rec = ranker.recommend([12, 7, 301], k=10)        # Recommendation(items [10], scores [10])
    ranker.apply_edit(edit)                           # validated, kept factored, base untouched
    items, scores = ranker.recommend_batch(histories, k=10)   # [B, 10], [B, 10]
    ranker.revert_edit()                              # bit-identical to before

Large catalogues: ``recommend`` / ``recommend_batch`` pre-select candidates with a faiss
index (:mod:`device_ranker.ann`) when ``AnnConfig.active(I)`` (from ``min_items`` items
on, or forced), then score the candidates exactly; ``scores`` stays exact.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch

from device_ranker.config import AnnConfig
from device_ranker.edit_apply import PreparedEdit, prepare_decoded, prepare_edit
from device_ranker.edits import EditBounds, HeadEdit
from device_ranker.features import History, _as_int64, check_item_range, history_kjt, seen_mask
from device_ranker.head import queries_per_user
from device_ranker.model import SeqRanker
from recsys.edit_payload import DecodedPayload
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

EditArg = HeadEdit | PreparedEdit | Literal["active", "base"] | None


@dataclass(frozen=True)
class Recommendation:
    """Top-K for one user: ``items`` [K] int64 item indices, ``scores`` [K] float32 (best
    first); ``item_ids`` the matching dataset ids when the ranker knows them."""

    items: torch.Tensor
    scores: torch.Tensor
    item_ids: list[str] | None = None


class Ranker:
    """Full-catalogue ranking with an optional head edit.

    Args:
        model: a trained :class:`SeqRanker` (put in eval mode; parameters frozen).
        item_ids: optional dataset item ids in index order (for ``Recommendation.item_ids``).
        bounds: limits enforced on every edit (:class:`EditBounds`).
        ann: large-catalogue pre-selection (:class:`AnnConfig`; default: on from 50,000
            items); the index is built once, on first use (:meth:`ann_index`).
    """

    def __init__(
        self,
        model: SeqRanker,
        *,
        item_ids: Sequence[str] | None = None,
        bounds: EditBounds | None = None,
        ann: AnnConfig | None = None,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.item_ids = list(item_ids) if item_ids is not None else None
        if self.item_ids is not None and len(self.item_ids) != model.cfg.num_items:
            raise ValidationError(f"{len(self.item_ids)} item ids for {model.cfg.num_items} items")
        self.bounds = bounds or EditBounds()
        # the edit path reads the head per edit: nn.Module attribute lookup costs ~1-5 us
        self._head = self.model.head
        # the payload's shape check per edit (``decode_values(spec=...)``): fixed per head
        self.payload_spec: Mapping[str, tuple[int, int]] = MappingProxyType(self._head.edit_spec())
        self._active: PreparedEdit | None = None
        self.ann_config = ann or AnnConfig()
        self._ann = None  # AnnIndex, built on first use
        self._ann_lock = threading.Lock()

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, bounds: EditBounds | None = None, ann: AnnConfig | None = None
    ) -> Ranker:
        """Load the best weights of a training checkpoint (:mod:`device_ranker.train`)."""
        from device_ranker.train import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(path)
        return cls(
            model_from_checkpoint(ckpt), item_ids=ckpt.get("item_ids"), bounds=bounds, ann=ann
        )

    @property
    def num_items(self) -> int:
        return self.model.cfg.num_items

    def edit_spec(self) -> dict[str, tuple[int, int]]:
        """Head layer name -> (out, in): the shapes an edit must have (a new dict; the
        read-only ``payload_spec`` is the same, made once, for the per-edit decode)."""
        return self.model.head.edit_spec()

    def ann_index(self):
        """The faiss pre-selection index (:class:`~device_ranker.ann.AnnIndex`) when
        ``ann_config.active(I)``, built on the first call; else None."""
        if not self.ann_config.active(self.num_items):
            return None
        if self._ann is None:
            with self._ann_lock:
                if self._ann is None:
                    from device_ranker.ann import AnnIndex

                    bias = self.model.item_bias if self.model.cfg.item_bias else None
                    self._ann = AnnIndex(self.model.item_table, bias, self.ann_config)
        return self._ann

    # ---- edits ----------------------------------------------------------------------
    def prepare(self, edit: HeadEdit) -> PreparedEdit:
        """Validate ``edit`` and build its (factored) effective head weights (no autograd)."""
        return prepare_edit(self._head, edit, self.bounds)

    def prepare_decoded(
        self, decoded: DecodedPayload, prototype: HeadEdit | None = None
    ) -> PreparedEdit:
        """Validate a payload decoded with ``decode_values(data, spec=self.edit_spec(),
        max_rank=self.bounds.max_rank)`` (+ the prototype it is a residual of) and build
        its factored head weights: the device's fast path
        (:func:`~device_ranker.edit_apply.prepare_decoded`)."""
        return prepare_decoded(self._head, decoded, self.bounds, prototype)

    def apply_edit(self, edit: HeadEdit | PreparedEdit) -> PreparedEdit:
        """Make ``edit`` the active edit (validated; base weights never overwritten)."""
        prepared = edit if isinstance(edit, PreparedEdit) else self.prepare(edit)
        self._active = prepared
        return prepared

    def revert_edit(self) -> None:
        """Back to the base head; scores are then bit-identical to before any edit."""
        self._active = None

    @property
    def active_edit(self) -> HeadEdit | None:
        return None if self._active is None else self._active.edit

    def _weights(self, edit: EditArg):
        """Head weights for ``edit`` (None = the base parameters)."""
        if isinstance(edit, str):
            if edit == "active":
                active = self._active  # one read: apply/revert from another thread is atomic
                return None if active is None else active.weights
            if edit == "base":
                return None
            raise ValidationError(f"edit must be 'active', 'base', None or an edit, got {edit!r}")
        if edit is None:
            return None
        if isinstance(edit, PreparedEdit):
            return edit.weights
        return self.prepare(edit).weights

    # ---- scoring --------------------------------------------------------------------
    def _check(self, histories: Sequence[History]) -> list[np.ndarray]:
        hs = [_as_int64(h) for h in histories]
        for h in hs:
            check_item_range(h, self.num_items, "history item index")
        return hs

    def user_states(
        self, histories: Sequence[History], extra: Mapping[str, Sequence[History]] | None = None
    ) -> torch.Tensor:
        """B histories -> user states [B, D] (the part that does not depend on the edit)."""
        with torch.inference_mode():
            return self.model.user_states(history_kjt(histories, self.model.cfg.max_len, extra))

    def scores(
        self,
        histories: Sequence[History],
        *,
        edit: EditArg = "active",
        extra: Mapping[str, Sequence[History]] | None = None,
    ) -> torch.Tensor:
        """Raw full-catalogue scores [B, I] (nothing excluded).

        ``edit``: ``"active"`` (default), ``"base"``/None, a :class:`HeadEdit` (validated
        now) or a :class:`PreparedEdit`.
        """
        q = self.queries(histories, edit=edit, extra=extra)  # [B, D]
        with torch.inference_mode():
            return self.model.item_scores(q)  # [B, I]

    def queries(
        self,
        histories: Sequence[History],
        *,
        edit: EditArg = "active",
        extra: Mapping[str, Sequence[History]] | None = None,
    ) -> torch.Tensor:
        """Head outputs [B, D] (the queries the item table is scored with)."""
        hs = self._check(histories)
        weights = self._weights(edit)
        with torch.inference_mode():
            states = self.model.user_states(
                history_kjt(hs, self.model.cfg.max_len, extra)
            )  # [B, D]
            return self.model.head(states, weights)  # [B, D]

    def scores_per_user_edits(
        self, histories: Sequence[History], edits: Sequence[HeadEdit | PreparedEdit | None]
    ) -> torch.Tensor:
        """Scores [B, I] with a different edit per user (None = base), one batched pass."""
        if len(edits) != len(histories):
            raise ValidationError(f"{len(edits)} edits for {len(histories)} users")
        hs = self._check(histories)
        weights = [None if e is None else self._weights(e) for e in edits]
        with torch.inference_mode():
            states = self.model.user_states(history_kjt(hs, self.model.cfg.max_len))  # [B, D]
            q = queries_per_user(self.model.head, states, weights)  # [B, D]
            return self.model.item_scores(q)  # [B, I]

    @staticmethod
    def mask_and_topk(
        scores: torch.Tensor, exclude: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [B, I], exclude [B, I] bool -> top-K items [B, K], scores [B, K].

        Excluded items score -inf; K is capped at I. Rows with fewer than K allowed items
        end with -inf entries (callers drop them; :meth:`recommend` does).
        """
        if k < 1:
            raise ValidationError(f"k must be >= 1, got {k}")
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return top.indices, top.values

    def recommend(
        self,
        history: History,
        k: int = 10,
        *,
        exclude_seen: bool = True,
        exclude: Sequence[int] | None = None,
        candidates: Sequence[int] | None = None,
        edit: EditArg = "active",
    ) -> Recommendation:
        """Top-K for one user over the catalogue (or ``candidates``), seen items excluded.

        Without ``candidates`` a large catalogue goes through the ANN index
        (:meth:`ann_index`); the returned scores are exact either way.
        """
        h = self._check([history])[0]
        index = self.ann_index() if candidates is None else None
        if index is not None:
            from device_ranker.ann import ann_topk

            parts = [h] if exclude_seen else []
            if exclude is not None:
                ex = _as_int64(exclude)
                check_item_range(ex, self.num_items, "excluded item index")
                parts.append(ex)
            excl = np.concatenate(parts) if parts else None
            with torch.inference_mode():
                items, top = ann_topk(index, self.queries([h], edit=edit), [excl], k)
            keep = torch.isfinite(top[0])
            items, top = items[0][keep], top[0][keep]
            ids = [self.item_ids[i] for i in items.tolist()] if self.item_ids is not None else None
            return Recommendation(items=items, scores=top, item_ids=ids)
        scores = self.scores([h], edit=edit)  # [1, I]
        mask = (
            seen_mask([h], self.num_items)
            if exclude_seen
            else torch.zeros_like(scores, dtype=torch.bool)
        )
        if exclude is not None:
            ex = _as_int64(exclude)
            check_item_range(ex, self.num_items, "excluded item index")
            mask[0, torch.from_numpy(ex)] = True
        if candidates is not None:
            cand = _as_int64(candidates)
            check_item_range(cand, self.num_items, "candidate item index")
            allowed = torch.zeros_like(mask)
            allowed[0, torch.from_numpy(cand)] = True
            mask |= ~allowed
        items, top = self.mask_and_topk(scores, mask, k)
        keep = torch.isfinite(top[0])
        items, top = items[0][keep], top[0][keep]
        ids = [self.item_ids[i] for i in items.tolist()] if self.item_ids is not None else None
        return Recommendation(items=items, scores=top, item_ids=ids)

    def recommend_batch(
        self,
        histories: Sequence[History],
        k: int = 10,
        *,
        exclude_seen: bool = True,
        edit: EditArg = "active",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K for B users: items [B, K] int64, scores [B, K] (-inf past the allowed items).

        A large catalogue goes through the ANN index (:meth:`ann_index`; exact scores of
        its candidates).
        """
        hs = self._check(histories)
        index = self.ann_index()
        if index is not None:
            from device_ranker.ann import ann_topk

            with torch.inference_mode():
                q = self.queries(hs, edit=edit)  # [B, D]
                return ann_topk(index, q, hs if exclude_seen else [None] * len(hs), k)
        scores = self.scores(hs, edit=edit)
        return self.mask_and_topk(
            scores, seen_mask(hs, self.num_items) if exclude_seen else None, k
        )

    # ---- deployment -----------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write the deployable serving program (see :mod:`device_ranker.export`)."""
        from device_ranker.export import export_ranker

        return export_ranker(self, directory)
