"""Ragged user histories -> TorchRec ``KeyedJaggedTensor`` and dense helpers.

A *history* is a user's item indices in time order (oldest first), any length, possibly
empty. The encoder reads the last T = ``max_len`` of them.

Example::

    kjt = history_kjt([[3, 1, 4], []], max_len=2)
    kjt.keys(), kjt.lengths()        # (['item'], tensor([2, 0]))
    kjt.values()                     # tensor([1, 4])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

ITEM_FEATURE = "item"

History = Sequence[int] | np.ndarray | torch.Tensor


def _as_int64(h: History) -> np.ndarray:
    if isinstance(h, torch.Tensor):
        return h.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    return np.asarray(h, dtype=np.int64).reshape(-1)


def truncate(histories: Sequence[History], max_len: int) -> list[np.ndarray]:
    """The last ``max_len`` events of each history, as int64 arrays."""
    return [_as_int64(h)[-max_len:] if max_len > 0 else _as_int64(h)[:0] for h in histories]


def check_item_range(values: np.ndarray, num_items: int, what: str = "item index") -> None:
    """Raise :class:`ValidationError` if any value is outside ``0..num_items-1``."""
    if values.size and (values.min() < 0 or values.max() >= num_items):
        bad = values[(values < 0) | (values >= num_items)][0]
        raise ValidationError(f"{what} {int(bad)} is outside 0..{num_items - 1}")


def history_kjt(
    histories: Sequence[History],
    max_len: int,
    extra: Mapping[str, Sequence[History]] | None = None,
) -> KeyedJaggedTensor:
    """Build the encoder's KJT: key ``item`` plus one key per extra aligned feature.

    Args:
        histories: B ragged item-index sequences, oldest first (empty allowed).
        max_len: T, keep the last T events of each history.
        extra: optional feature name -> B ragged id sequences aligned with
            ``histories`` (same length per user; e.g. one codebook level's codes).

    Returns:
        KJT with keys ``["item", *extra]``, stride B, lengths min(len, T) per user.
    """
    items = truncate(histories, max_len)
    lengths = np.fromiter((len(h) for h in items), dtype=np.int64, count=len(items))  # [B]
    keys = [ITEM_FEATURE]
    values = [np.concatenate(items) if items else np.zeros(0, dtype=np.int64)]
    all_lengths = [lengths]
    for name, seqs in (extra or {}).items():
        if len(seqs) != len(histories):
            raise ValidationError(
                f"feature {name!r} has {len(seqs)} sequences for {len(histories)} users"
            )
        full = [_as_int64(s) for s in seqs]
        for u, (s, h) in enumerate(zip(full, histories, strict=True)):
            if len(s) != len(_as_int64(h)):
                raise ValidationError(
                    f"feature {name!r}, user {u}: {len(s)} ids but {len(_as_int64(h))} history items; "
                    "extra features must be aligned with the item history"
                )
        cut = truncate(full, max_len)
        keys.append(name)
        values.append(np.concatenate(cut) if cut else np.zeros(0, dtype=np.int64))
        all_lengths.append(lengths)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(all_lengths)),
    )


def pad_histories(histories: Sequence[History], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded dense ids for the export path.

    Returns:
        ids [B, T] int64 (padding = 0, masked by ``lengths``), lengths [B] int64.
    """
    items = truncate(histories, max_len)
    ids = np.zeros((len(items), max_len), dtype=np.int64)
    lengths = np.zeros(len(items), dtype=np.int64)
    for b, h in enumerate(items):
        ids[b, : len(h)] = h
        lengths[b] = len(h)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def seen_mask(histories: Sequence[History], num_items: int) -> torch.Tensor:
    """[B, I] bool, True where the item occurs anywhere in the user's (full) history."""
    full = [_as_int64(h) for h in histories]
    rows = np.repeat(np.arange(len(full)), [len(h) for h in full])
    cols = np.concatenate(full) if full else np.zeros(0, dtype=np.int64)
    mask = torch.zeros(len(full), num_items, dtype=torch.bool)
    mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
    return mask
