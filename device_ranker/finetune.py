"""The costly baseline: on-device gradient fine-tuning of the head only.

Given a user's recent events, the frozen embeddings + encoder give a state at every
position (once, no gradient); then ``steps`` Adam steps train a *copy* of the head on
next-item prediction (full softmax over the catalogue) at those positions. The result
is returned as a dense :class:`~device_ranker.edits.HeadEdit` (tuned - base), so the
replay evaluator applies it through exactly the same path as a cloud edit; the model
itself is never modified.

Cost figures returned (for the comparison the design asks for):

* ``wall_ms``: wall time of the whole fine-tuning (encoder pass + steps), uninstrumented;
* ``flops``: counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul-class ops:
  forward and backward) in a second, identical run;
* ``peak_bytes``: peak live bytes allocated by torch during a third identical run, from
  the profiler's allocation/free events (torch has no CPU memory statistics and
  ``tracemalloc`` does not see torch's allocator).

Example::

    res = finetune_head(model, history=[5, 9, 2, 40, 7], steps=5)
    res.wall_ms, res.flops, res.peak_bytes
    ranker.apply_edit(res.edit)      # bounds permitting; or Ranker(..., bounds=UNBOUNDED)
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from device_ranker.edits import EditBounds, HeadEdit, LayerEdit
from device_ranker.features import History, _as_int64, check_item_range, history_kjt
from device_ranker.head import head_forward
from device_ranker.model import SeqRanker
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

#: Bounds that accept any finite fine-tuning result (the baseline is not clipped).
UNBOUNDED = EditBounds(max_weight_norm=None, max_bias_abs=float("inf"))


@dataclass
class FinetuneResult:
    """Outcome and cost of one user's head fine-tuning."""

    edit: HeadEdit  # dense + bias deltas (tuned - base) for every head layer
    losses: list[float]  # training loss before each step
    steps: int
    positions: int  # training targets used (events - 1)
    wall_ms: float
    flops: int | None = None
    peak_bytes: int | None = None


def _run(
    model: SeqRanker, history: np.ndarray, steps: int, lr: float
) -> tuple[list[torch.Tensor], list[float]]:
    t = model.cfg.max_len
    window = history[-(t + 1) :]
    with torch.no_grad():
        states, _lengths = model.sequence_states(history_kjt([window[:-1]], t))  # [1, T, D]
        x = states[0, : len(window) - 1]  # [P, D]
        table, bias = model.item_table.detach(), model.item_bias.detach()  # [I, D], [I]
    targets = torch.from_numpy(window[1:].copy())  # [P]
    params = [
        w.detach().clone().requires_grad_(True) for wb in model.head.base_weights() for w in wb
    ]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            weights = [(params[2 * i], params[2 * i + 1]) for i in range(len(params) // 2)]
            q = head_forward(x, weights, model.head.residual)  # [P, D]
            loss = F.cross_entropy(F.linear(q, table, bias), targets)  # logits [P, I]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return [p.detach() for p in params], losses


def _peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (
            (e.time_range.start, e.self_cpu_memory_usage)
            for e in prof.events()
            if e.self_cpu_memory_usage
        ),
        key=lambda ev: ev[0],
    )
    return max(itertools.accumulate(v for _, v in events), default=0)


def finetune_head(
    model: SeqRanker, history: History, *, steps: int = 5, lr: float = 1e-2, measure: bool = True
) -> FinetuneResult:
    """Fine-tune a copy of the head on ``history`` (oldest first, >= 2 events).

    Args:
        model: the trained ranker (not modified).
        history: the user's recent item indices; the last T + 1 are used.
        steps: optimiser steps (each a full-catalogue softmax over the P positions).
        lr: Adam learning rate.
        measure: also count FLOPs and peak memory (two extra identical runs).

    Returns:
        :class:`FinetuneResult` with the edit and its cost.
    """
    h = _as_int64(history)
    if len(h) < 2:
        raise ValidationError(f"fine-tuning needs >= 2 events, got {len(h)}")
    if steps < 1:
        raise ValidationError(f"steps must be >= 1, got {steps}")
    check_item_range(h, model.cfg.num_items, "history item index")
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        tuned, losses = _run(model, h, steps, lr)
        wall_ms = (time.perf_counter() - t0) * 1e3
        flops = peak = None
        if measure:
            counter = FlopCounterMode(display=False)
            with counter:
                _run(model, h, steps, lr)
            flops = int(counter.get_total_flops())
            peak = _peak_bytes(lambda: _run(model, h, steps, lr))
    finally:
        model.train(was_training)
    base = [w for wb in model.head.base_weights() for w in wb]
    layers = {
        name: LayerEdit(
            dense=(tuned[2 * i] - base[2 * i]).detach(),
            bias=(tuned[2 * i + 1] - base[2 * i + 1]).detach(),
        )
        for i, name in enumerate(model.head.layer_names())
    }
    return FinetuneResult(
        edit=HeadEdit(layers, {"source": "finetune", "steps": steps, "lr": lr}),
        losses=losses,
        steps=steps,
        positions=min(len(h), model.cfg.max_len + 1) - 1,
        wall_ms=wall_ms,
        flops=flops,
        peak_bytes=peak,
    )
