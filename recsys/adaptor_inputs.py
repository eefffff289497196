"""The adaptor-input contract: what the edit generators read, defined once.

Training (:mod:`recsys.workflows.adaptor_data`), the offline replay, the cloud service
(:mod:`llm_cloud.service.engine`) and the device service (:mod:`device_ranker.service`)
all build the adaptor's inputs with these functions, so they cannot drift apart
(``tests/recsys/workflows/test_adaptor_input_parity.py`` feeds one history through the training path and
through both real gRPC servers and compares the inputs).

A request is made from a device history (item indices, oldest first) and carries:

* the **uplink window**: the device's last ``uplink_items`` items (:func:`uplink_window`);
  the cloud sees nothing else of the history;
* the **device summary** [S = 2D] (:func:`device_summary`), laid out as
  ``SUMMARY_LAYOUT``: the mean item embedding of the last ``summary_items`` items, then
  the ranker's user state of the whole history;
* from those, the cloud's **tokens**: a :class:`TokenSource` maps uplink windows to N
  items [B, N] (-1 padded) and optional scores [B, N]; :func:`item_codes` turns the
  items into their semantic IDs [B, N, L+1] (the adaptor's token input). The DUET
  baseline reads :func:`recent_items` (raw ids, most recent first) instead.

Shape letters: B requests, N input items, L+1 semantic-ID levels, D ranker width,
I catalogue items, K summary items.

Example::

    window = uplink_window(history, 20)                        # [<=20] int64
    items, scores = RecentTokens(20)([window])                # [1, 20], None
    codes = item_codes(items, semantic_ids)                   # [1, 20, L+1]
    summary = device_summary(item_table, [history], state[None], 10)   # [1, 2D]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from recsys.errors import ValidationError

# The summary's parts, in order, each D wide.
SUMMARY_LAYOUT = ("mean embedding of the last summary_items items", "user state")


def summary_width(dim: int) -> int:
    """S for a ranker of width D: ``len(SUMMARY_LAYOUT) * D``."""
    return len(SUMMARY_LAYOUT) * int(dim)


def uplink_window(history: Sequence[int] | np.ndarray, uplink_items: int) -> np.ndarray:
    """The items a request uplinks: the last ``uplink_items`` of ``history``, int64, oldest first."""
    if uplink_items < 1:
        raise ValidationError(f"uplink_items must be >= 1, got {uplink_items}")
    return np.asarray(history, dtype=np.int64)[-uplink_items:]


def recent_items(histories: Sequence[np.ndarray], n: int) -> np.ndarray:
    """The last ``n`` items of each history, most recent first, -1 padded: int64 [B, N]."""
    out = np.full((len(histories), n), -1, dtype=np.int64)
    for b, h in enumerate(histories):  # B is a request batch; each row is one slice copy
        tail = np.asarray(h, dtype=np.int64)[-n:][::-1]
        out[b, : len(tail)] = tail
    return out


def item_codes(items: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Item indices [B, N] (-1 = padding) -> semantic IDs [B, N, L+1] (-1 rows for padding).

    ``codes`` [I, L+1] is the codebook's ID table (``SemanticIdMap.codes``)."""
    out = np.asarray(codes)[np.clip(items, 0, None)]  # [B, N, L+1]
    out[items < 0] = -1
    return out


def device_summary(
    item_table: torch.Tensor, histories: Sequence[np.ndarray], states: torch.Tensor, k: int
) -> torch.Tensor:
    """The device summary [B, S] (``SUMMARY_LAYOUT``): [mean item embedding of the last
    ``k`` items (zeros for an empty history), user state].

    Args:
        item_table: [I, D] the ranker's item embeddings.
        histories: B item-index arrays, oldest first.
        states: [B, D] the ranker's user states of those histories.
        k: ``summary_items``.
    """
    if states.shape[0] != len(histories):
        raise ValidationError(f"{states.shape[0]} user states for {len(histories)} histories")
    recent = torch.from_numpy(recent_items(histories, k))  # [B, K]
    mask = (recent >= 0).to(item_table.dtype).unsqueeze(-1)  # [B, K, 1]
    emb = item_table[recent.clamp_min(0)] * mask  # [B, K, D]
    pooled = emb.sum(1) / mask.sum(1).clamp_min(1.0)  # [B, D]
    return torch.cat([pooled, states], dim=1)  # [B, 2D]


def check_summary(values: Sequence[float] | np.ndarray, width: int) -> np.ndarray:
    """A received summary as float32 [S]; ValidationError on a wrong length or NaN/Inf."""
    vec = np.asarray(values, dtype=np.float32).reshape(-1)
    if not np.isfinite(vec).all():
        raise ValidationError("the summary vector contains NaN or Inf")
    if len(vec) != width:
        raise ValidationError(
            f"summary has {len(vec)} values; this adaptor reads {width} "
            f"({' + '.join(SUMMARY_LAYOUT)}, {width // len(SUMMARY_LAYOUT)} each)"
        )
    return vec


class TokenSource(Protocol):
    """Uplink windows -> the adaptor's input items [B, N] (-1 padded) and scores [B, N]
    (or None). ``name`` is written into artefacts and results."""

    name: str
    n: int

    def __call__(self, windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]: ...

    def close(self) -> None: ...


class RecentTokens:
    """The N most recent uplinked items, most recent first, no scores (the stand-in the
    adaptor reads when it was trained without an LM)."""

    name = "recent"

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def __call__(self, windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        return recent_items(windows, self.n), None

    def close(self) -> None:
        pass


class LMTokens:
    """The codebook LM's top-N generated next items and their log-probs.

    ``backend`` is any object with ``generate(histories, top_n) -> [[(item, score), ...]]``
    and ``close()`` (the ``llm_cloud.backends`` backends); one batched call per batch.
    """

    name = "lm"

    def __init__(self, backend: Any, n: int) -> None:
        self.backend = backend
        self.n = int(n)

    def __call__(self, windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        ranked = self.backend.generate([[int(i) for i in w] for w in windows], top_n=self.n)
        items = np.full((len(windows), self.n), -1, dtype=np.int64)
        scores = np.zeros((len(windows), self.n), dtype=np.float32)
        for b, row in enumerate(ranked):  # B x N Python values from the backend's answer
            for j, (item, score) in enumerate(row[: self.n]):
                items[b, j], scores[b, j] = item, score
        return items, scores

    def close(self) -> None:
        self.backend.close()


class NoTokens:
    """No tokens (the summary-only ablation): every request's N input items are padding
    (-1), so the adaptor's token path pools to exactly zero (``masked_pool`` of an
    all-masked row) and no gradient reaches it; the edit code depends on the device
    summary alone. The device needs to uplink no items for it."""

    name = "none"

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def __call__(self, windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        return np.full((len(windows), self.n), -1, dtype=np.int64), None

    def close(self) -> None:
        pass


__all__ = [
    "SUMMARY_LAYOUT",
    "LMTokens",
    "NoTokens",
    "RecentTokens",
    "TokenSource",
    "check_summary",
    "device_summary",
    "item_codes",
    "recent_items",
    "summary_width",
    "uplink_window",
]
