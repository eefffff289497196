"""The codebook LM's training data: users' histories as token windows, and the splits.

Shapes: B batch of windows, T tokens per window, H history items per window
(<= ``max_history``), D = L+1 tokens per semantic ID.

Each user's training-period history (item indices in time order) is cut into windows of
up to ``max_history + 1`` items ending every ``stride`` items (plus always at the user's
last item, with a random shift per epoch). A window [h_1 .. h_H, t] is written exactly
like a serving prompt followed by its answer::

    <bos> <user> ID(h_1) ... ID(h_H) <sep> ID(t) <eos>

with a loss weight per token (:func:`encode_window`): the answer ``ID(t) <eos>`` weighs 1
and the history IDs ``history_loss_weight``, each predicted from the items before it, so
one window trains H+1 next-item predictions instead of one. ``<bos> <user> <sep>`` are
never targets.

Example::

    seqs, pairs, info = dataset_sequences(ds, "time")
    windows = build_windows(seqs, max_history=20, stride=20, rng=np.random.default_rng(0))
    ids, mask, weights = collate(vocab, windows[:64], history_weight=1.0)   # [B, T] each
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llm_cloud.prompts import ItemVocab
from recsys.errors import ValidationError

SPLITS = ("time", "loo")


def window_ends(length: int, stride: int, shift: int) -> list[int]:
    """Indices of the target items of one user's windows: the last item, then every
    ``stride`` items back (offset by ``shift`` in [0, stride)), never index 0."""
    if length < 2:
        return []
    ends = [length - 1]
    pos = length - 1 - stride + shift
    while pos >= 1:
        if pos != ends[-1]:
            ends.append(pos)
        pos -= stride
    return ends


def encode_window(
    vocab: ItemVocab, items: Sequence[int], history_weight: float
) -> tuple[list[int], list[float]]:
    """Window [h_1..h_H, t] -> (token ids [T], loss weight of predicting each token [T]).

    Weight 0 for tokens never predicted (<bos>, <user>, <sep>, item text of a vocabulary
    with text), ``history_weight`` for history ID tokens, 1 for the answer's ID tokens
    and <eos>. The history is laid out by :meth:`ItemVocab.history_tokens`, exactly as
    a serving prompt.
    """
    head = vocab.prefix_ids()
    hist, is_id = vocab.history_tokens([int(i) for i in items[:-1]])
    answer = vocab.item_tokens[int(items[-1])].tolist()
    ids = [*head, *hist, vocab.specials.sep, *answer, vocab.specials.eos]
    hist_w = [history_weight if flag else 0.0 for flag in is_id]
    weights = [0.0] * len(head) + hist_w + [0.0] + [1.0] * (len(answer) + 1)
    return ids, weights


def build_windows(
    seqs: Sequence[np.ndarray], max_history: int, stride: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Every training window (item arrays, last = target) of one epoch."""
    out: list[np.ndarray] = []
    for seq in seqs:
        shift = int(rng.integers(0, stride)) if rng is not None else 0
        for end in window_ends(len(seq), stride, shift):
            out.append(seq[max(0, end - max_history) : end + 1])
    return out


def pad_batch(
    encoded: Sequence[tuple[list[int], list[float]]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, weights) sequences -> right-padded (input_ids [B, T],
    attention_mask [B, T], weights [B, T])."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    weights = torch.zeros((len(encoded), width))
    for row, (tokens, w) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        weights[row, : len(tokens)] = torch.tensor(w)
    return ids, mask, weights


def collate(
    vocab: ItemVocab, windows: Sequence[np.ndarray], history_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch of windows: (input_ids [B, T], attention_mask [B, T], weights [B, T])."""
    encoded = [encode_window(vocab, w, history_weight) for w in windows]
    return pad_batch(encoded, vocab.specials.pad)


def dataset_sequences(
    ds: Any, split: str = "time", *, quantile: float = 0.8
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, int]], dict[str, Any]]:
    """Training sequences and validation pairs of a dataset under a split protocol.

    * ``loo``: leave-one-out by time; train on the LOO training rows, validate on each
      user's second-to-last event (the test event stays unseen).
    * ``time``: the training period of :func:`recsys.data.splits.time_split`; each user's
      last training-period event is held out for validation (users with >= 3 events).

    Returns:
        (train_seqs [U][n_u], valid_pairs [(history, target)], split summary).
    """
    from recsys.data.splits import leave_one_out, time_split, user_sequences

    if split == "loo":
        loo = leave_one_out(ds)
        seqs = user_sequences(ds, loo.train)
        valid_items = ds.item_index[loo.valid]
        pairs = [
            (seqs[u], int(t)) for u, t in zip(loo.users.tolist(), valid_items.tolist(), strict=True)
        ]
        summary = {"split": "loo", "train_events": len(loo.train), "valid_users": len(pairs)}
        return list(seqs), pairs, summary
    if split == "time":
        ts = time_split(ds, quantile=quantile)
        full = user_sequences(ds, ts.train)
        seqs, pairs = [], []
        for s in full:
            if len(s) >= 3:
                seqs.append(s[:-1])
                pairs.append((s[:-1], int(s[-1])))
            else:
                seqs.append(s)
        summary = {"split": "time", **ts.summary(), "valid_users": len(pairs)}
        return seqs, pairs, summary
    raise ValidationError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


__all__ = [
    "SPLITS",
    "build_windows",
    "collate",
    "dataset_sequences",
    "encode_window",
    "pad_batch",
    "window_ends",
]
