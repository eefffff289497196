"""The generator training loop, identical for the adaptor and the DUET-style baseline.

AdamW, gradient clipping, seeded shuffling, tqdm, early stopping on the held-out users'
next-window loss (users, not windows, are held out); the best epoch's weights are kept,
epoch 0 (the untrained generator, whose edit is exactly zero) included.

Example::

    train_idx, held_idx = split_users(data, 0.1, seed=0)
    result = train_generator("adaptor", adaptor, frozen, data, LoopConfig(epochs=5),
                             train_idx, held_idx, progress=False)
    result.best_epoch, result.history[-1]["holdout_ndcg@10"]
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from recsys.metrics import hit_rate_at_k, ndcg_at_k
from recsys.workflows.adaptor_config import LoopConfig
from recsys.workflows.adaptor_data import FrozenRanker, WindowData, generator_inputs, window_loss

logger = logging.getLogger(__name__)


@dataclass
class GeneratorResult:
    """Outcome of :func:`train_generator` (``model`` holds the best weights)."""

    model: torch.nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    base_holdout: dict[str, float]
    seconds: float


def split_users(data: WindowData, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Window indices of training users and of held-out users (by user, seeded)."""
    users = np.unique(data.users)
    perm = np.random.default_rng(seed).permutation(users)
    held = set(perm[: max(1, round(share * len(users)))].tolist())
    is_held = np.array([u in held for u in data.users])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def evaluate_windows(
    kind: str,
    model: torch.nn.Module | None,
    frozen: FrozenRanker,
    data: WindowData,
    idx: np.ndarray,
    mask_seen: bool,
    batch_size: int = 512,
) -> dict[str, float]:
    """Held-out next-window loss / NDCG@10 / HR@10 with the generator's edits (or none)."""
    losses, ranks = [], []
    if model is not None:
        model.eval()
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            edit = None if model is None else model(*generator_inputs(kind, data, part))
            loss, r = window_loss(frozen, data, part, edit, mask_seen)
            losses.append(float(loss) * len(r))
            ranks.append(r)
    return window_report(losses, ranks)


def window_report(losses: list[float], ranks: list[torch.Tensor]) -> dict[str, float]:
    """Batches' summed losses and target ranks -> mean loss, NDCG@10, HR@10, targets."""
    rk = torch.cat(ranks)
    return {
        "loss": sum(losses) / max(len(rk), 1),
        "ndcg@10": float(ndcg_at_k(rk, 10).mean()),
        "hr@10": float(hit_rate_at_k(rk, 10).mean()),
        "targets": len(rk),
    }


def train_generator(
    kind: str,
    model: torch.nn.Module,
    frozen: FrozenRanker,
    data: WindowData,
    loop: LoopConfig,
    *,
    progress: bool = True,
) -> GeneratorResult:
    """Train ``model`` (an :class:`Adaptor` for ``kind="adaptor"``, a
    :class:`DuetGenerator` for ``"duet"``) so its edits lower the next-window loss."""
    t0 = time.perf_counter()
    train_idx, held_idx = split_users(data, loop.holdout_users, loop.seed)
    base = evaluate_windows(kind, None, frozen, data, held_idx, loop.mask_seen)
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    # epoch 0 = the untrained generator, whose edit is exactly zero (s = 0, bias = 0): if no
    # epoch beats the frozen ranker on the held-out users, the identity edit is kept
    start = evaluate_windows(kind, model, frozen, data, held_idx, loop.mask_seen)
    best = {
        "loss": start["loss"],
        "epoch": 0,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    history: list[dict[str, float | None]] = [
        {
            "epoch": 0,
            "train_loss": None,
            **{f"holdout_{k}": v for k, v in start.items() if k != "targets"},
            "seconds": 0.0,
        }
    ]
    bar = tqdm(total=loop.epochs, desc=f"train {kind}", disable=not progress, leave=False)
    bad = 0
    for epoch in range(1, loop.epochs + 1):
        te = time.perf_counter()
        torch.manual_seed(loop.seed * 100_003 + epoch)  # dropout
        order = np.random.default_rng([loop.seed, epoch]).permutation(train_idx)
        model.train()
        total, n = 0.0, 0
        for start in range(0, len(order), loop.batch_size):
            part = order[start : start + loop.batch_size]
            edit = model(*generator_inputs(kind, data, part))
            loss, _ = window_loss(frozen, data, part, edit, loop.mask_seen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
            opt.step()
            total += float(loss.detach())
            n += 1
        held = evaluate_windows(kind, model, frozen, data, held_idx, loop.mask_seen)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(n, 1),
                **{f"holdout_{k}": v for k, v in held.items() if k != "targets"},
                "seconds": time.perf_counter() - te,
            }
        )
        if held["loss"] < best["loss"] - 1e-5:
            best = {
                "loss": held["loss"],
                "epoch": epoch,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
            bad = 0
        else:
            bad += 1
        bar.update(1)
        bar.set_postfix(
            loss=f"{held['loss']:.4f}", ndcg=f"{held['ndcg@10']:.4f}", base=f"{base['loss']:.4f}"
        )
        logger.info(
            "%s epoch %d: train %.4f, held-out loss %.4f (base %.4f), ndcg@10 %.4f (base %.4f)",
            kind,
            epoch,
            total / max(n, 1),
            held["loss"],
            base["loss"],
            held["ndcg@10"],
            base["ndcg@10"],
        )
        if bad >= loop.patience:
            break
        if time.perf_counter() - t0 > 60 * (loop.max_minutes or math.inf):
            logger.info(
                "%s: time budget of %.1f min reached after epoch %d", kind, loop.max_minutes, epoch
            )
            break
    bar.close()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return GeneratorResult(model, history, int(best["epoch"]), base, time.perf_counter() - t0)


__all__ = [
    "GeneratorResult",
    "evaluate_windows",
    "split_users",
    "train_generator",
    "window_report",
]
