"""Continual cloud learning: the adaptor keeps training on what devices uplinked.

The generator is trained once on the training period; afterwards the cloud still sees,
with every request, the device's uplinked window (its tokens and summary) and, when the
device also sends its recent user states (as ``system-refine`` requests do), the items
that followed the device's previous request and the states before them. Each such pair
is one **uplinked example**, exactly the shape of a training window: "from this request's
input, the edit should rank these next items". :class:`ContinualLearner` buffers the
examples as they arrive and, when asked (:meth:`ContinualLearner.refresh`, at a stream-
time interval the caller chooses), takes a few AdamW steps of the adaptor's training
objective (next-window full-softmax cross-entropy of the frozen ranker with the edit,
already-uplinked items excluded from the softmax) on the most recent ones. Nothing else
is read: an example exists only once the request that completes it has arrived, so an
edit can depend only on events uplinked before it was made.

Shapes: B examples, N input tokens, L+1 semantic-ID levels, S summary width, W window
positions, D ranker width, I items.

Example::

    learner = ContinualLearner(adaptor, head, ContinualConfig())
    learner.add(UplinkExample(7, codes, None, summary, states, targets, seen))
    learner.refresh()          # -> {"steps": 20, "loss_before": ..., "ms": ...}
    learner.adaptor(codes[None], None, summary[None])   # the refreshed generator
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from codebook.refine import HeadTensors, lowrank_queries
from recsys.validation import config_dataclass


@config_dataclass
class ContinualConfig:
    """How the cloud's adaptor keeps learning (fixed a priori, not tuned on the replay:
    a tenth of the training learning rate, ten refreshes over the period)."""

    # stream time between two refreshes; None: a tenth of the replay period's span
    interval_s: float | None = Field(None, gt=0)
    steps: int = Field(20, ge=0)  # AdamW steps per refresh (0 = never changes)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=1)  # examples per step
    buffer: int = Field(4096, ge=1)  # the most recent examples a refresh samples from
    min_examples: int = Field(64, ge=1)  # no refresh before this many examples arrived
    # this share of the devices is held out: a refresh trains on the others' examples
    # and is kept only if it raises the held-out devices' NDCG@10 (measured: keeping it
    # when their loss drops still lost 0.0017 NDCG@10 on ml-100k; else the adaptor and the
    # optimiser go back to where they were); by device, since one device's consecutive
    # examples are too alike to check each other
    holdout: float = Field(0.2, gt=0.0, lt=1.0)
    validate: bool = True  # False: keep every refresh (the held-out loss is still reported)
    # no refresh before the held-out devices have this many examples: with ~30 (TikTok at
    # a 10 % budget) the check let a harmful refresh through (-0.0042 NDCG@10)
    min_held_out: int = Field(200, ge=1)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class UplinkExample:
    """One example the cloud assembled from two requests of a device.

    Attributes:
        device: who sent it (the held-out split is by device).
        codes: [N, L+1] the earlier request's adaptor tokens; scores: [N] or None.
        summary: [S] its device summary.
        states: [W, D] user states before each later item (uplinked with the later
            request); targets: [W] the items (-1 padding).
        seen: item ids the cloud knows the device had already seen (everything it
            uplinked so far), excluded from the softmax like training's ``mask_seen``.
    """

    device: int
    codes: np.ndarray
    scores: np.ndarray | None
    summary: torch.Tensor
    states: torch.Tensor
    targets: np.ndarray
    seen: np.ndarray


class ContinualLearner:
    """A private copy of the adaptor, refreshed on uplinked examples (module docstring).

    Args:
        adaptor: the trained generator (copied; the original is not touched).
        head: the frozen ranker head the edits apply to.
        cfg: :class:`ContinualConfig`.
    """

    def __init__(self, adaptor: torch.nn.Module, head: HeadTensors, cfg: ContinualConfig):
        self.adaptor = copy.deepcopy(adaptor)
        self.adaptor.eval()
        self.head = head
        self.cfg = cfg
        self.examples: deque[UplinkExample] = deque(maxlen=cfg.buffer)
        self.opt = torch.optim.AdamW(
            self.adaptor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.refreshes = 0
        self.accepted = 0
        self.seen_examples = 0

    def add(self, example: UplinkExample) -> None:
        self.examples.append(example)
        self.seen_examples += 1

    def loss(self, batch: list[UplinkExample]) -> torch.Tensor:
        """Mean next-window cross-entropy of the adaptor's edits on ``batch``."""
        return self._loss_and_ranks(batch)[0]

    def _loss_and_ranks(self, batch: list[UplinkExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-window cross-entropy on ``batch`` and the targets' ranks [n]
        (1-based, pessimistic ties, seen items excluded)."""
        codes = torch.from_numpy(np.stack([e.codes for e in batch]))  # [B, N, L+1]
        scores = None
        if batch[0].scores is not None:
            scores = torch.from_numpy(np.stack([e.scores for e in batch]))
        summary = torch.stack([e.summary for e in batch])  # [B, S]
        states = torch.stack([e.states for e in batch])  # [B, W, D]
        targets = torch.from_numpy(np.stack([e.targets for e in batch]))  # [B, W]
        edit = self.adaptor(codes, scores, summary)
        q = lowrank_queries(self.head.layers, self.head.residual, states, edit.tensors)
        logits = self.head.logits(q)  # [B, W, I]
        seen = next_window_mask([e.seen for e in batch], targets.numpy(), logits.shape[-1])
        logits = logits.masked_fill(seen, float("-inf"))
        valid = targets >= 0
        lv, tv = logits[valid], targets[valid]  # [n, I], [n]
        with torch.no_grad():
            ranks = (lv >= lv.gather(1, tv[:, None])).sum(1)
        return F.cross_entropy(lv, tv), ranks

    def refresh(self) -> dict[str, Any]:
        """``cfg.steps`` AdamW steps on batches drawn (seeded) from the buffer's examples
        of the training devices, kept only if the held-out devices' NDCG@10 went up; the
        adaptor is in eval mode afterwards. Returns what it did."""
        cfg = self.cfg
        n = len(self.examples)
        if n < cfg.min_examples or cfg.steps == 0:
            return {"steps": 0, "examples": n, "accepted": False}
        t0 = time.perf_counter()
        pool = list(self.examples)
        val = [e for e in pool if self.is_held_out(e.device)]
        train = [e for e in pool if not self.is_held_out(e.device)]
        if not train or len(val) < (cfg.min_held_out if cfg.validate else 1):
            return {"steps": 0, "examples": n, "held_out": len(val), "accepted": False}
        before, ndcg_before = self.held_out(val)
        saved = copy.deepcopy(self.adaptor.state_dict()), copy.deepcopy(self.opt.state_dict())
        rng = np.random.default_rng([cfg.seed, self.refreshes])
        self.adaptor.train()
        torch.manual_seed(cfg.seed * 100_003 + self.refreshes)  # dropout
        losses = []
        for _ in range(cfg.steps):
            idx = rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
            loss = self.loss([train[i] for i in idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.adaptor.parameters(), cfg.grad_clip)
            self.opt.step()
            losses.append(float(loss.detach()))
        self.adaptor.eval()
        after, ndcg_after = self.held_out(val)
        accepted = ndcg_after > ndcg_before or not cfg.validate
        if not accepted:
            self.adaptor.load_state_dict(saved[0])
            self.opt.load_state_dict(saved[1])
        self.refreshes += 1
        self.accepted += int(accepted)
        return {
            "steps": cfg.steps,
            "examples": n,
            "train_loss_first": losses[0],
            "train_loss_last": losses[-1],
            "held_out_before": before,
            "held_out_after": after,
            "held_out_ndcg10_before": ndcg_before,
            "held_out_ndcg10_after": ndcg_after,
            "accepted": accepted,
            "ms": (time.perf_counter() - t0) * 1e3,
        }

    def is_held_out(self, device: int) -> bool:
        """Whether ``device`` is one of the held-out devices (a fixed hash, seeded)."""
        h = (int(device) * 2654435761 + 97 * self.cfg.seed) % 2**32
        return h / 2**32 < self.cfg.holdout

    def held_out(self, examples: list[UplinkExample]) -> tuple[float, float]:
        """Mean loss and NDCG@10 of the adaptor (eval mode) on ``examples``, in batches."""
        self.adaptor.eval()
        bs = self.cfg.batch_size
        total, gains, n = 0.0, 0.0, 0
        with torch.no_grad():
            for a in range(0, len(examples), bs):
                part = examples[a : a + bs]
                loss, ranks = self._loss_and_ranks(part)
                total += float(loss) * len(ranks)
                gains += float(torch.where(ranks <= 10, 1.0 / torch.log2(ranks + 1.0), 0.0).sum())
                n += len(ranks)
        return total / max(n, 1), gains / max(n, 1)


def next_window_mask(seen: list[np.ndarray], targets: np.ndarray, num_items: int) -> torch.Tensor:
    """[B, W, I] bool, the items excluded from each window position's softmax: the row's
    ``seen`` items and the window's earlier targets, never the position's own target.

    Args:
        seen: B arrays of item ids; targets: [B, W] int64 (-1 padding).
    """
    b, w = targets.shape
    rows = np.concatenate([np.full(len(x), j) for j, x in enumerate(seen)] or [np.zeros(0)])
    cols = np.concatenate([np.asarray(x) for x in seen] or [np.zeros(0)]).astype(np.int64)
    base = torch.zeros(b, num_items, dtype=torch.bool)
    base[torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(cols)] = True
    mask = base.unsqueeze(1).repeat(1, w, 1)
    tg = torch.from_numpy(targets)
    for t in range(1, w):  # position t has also seen the targets before it
        prev = tg[:, t - 1]
        ok = torch.nonzero(prev >= 0).squeeze(1)
        mask[ok, t:, prev[ok]] = True
    valid = tg >= 0
    mask[(*valid.nonzero(as_tuple=True), tg[valid])] = False
    return mask
