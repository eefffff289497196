"""The learned request gate as the device service's trigger (``--gate-trigger learned``).

:class:`LearnedTrigger` wraps :class:`device_ranker.learned_gate.LearnedGate` (the
replay's trigger "learned", weights from ``recsys replay train-gate``) with the device
gates' interface (``decide``, ``on_request``, ``threshold``, ``config``), so the engine
and the cloud-edit requests use it like the shift gate or the timer.

Its features (``device_ranker.learned_gate.FEATURES``) in the service:

* ``shift``, ``log_since``, ``popularity``, ``shift_since``: as in the replay (the item
  table of the ranker, the model's popularity vector, the events since the last request).
* ``recent_rank`` / ``since_rank``: the base head's rank of each click at its position
  (catalogue minus the history, ties pessimistic). The engine ranks every click under the
  base head when this trigger is on (one probe pass per RecordEvent, shared with the harm
  guard's) and keeps the ranks beside the history (``UserState.base_ranks``). Clicks the
  device did not rank (seeded from the dataset, or from before a restart / eviction: the
  ranks are not in the durable state) are NaN, which the gate's mean skips (0.5 when
  no click is known), as the replay does for the starting history.
* ``log_length``: ``log(1 + L)`` of the history the device keeps, bounded by
  ``history_len`` (200 by default), where the replay uses the whole history; the feature
  saturates for longer users (a substitution; the shift and rank features do not
  depend on it).

The anchor (``GateState.anchor``) is the history length at the last request, as the
learned gate keeps it; with a bounded history (old events drop) it is re-derived before
each decision from the events since the request, so it stays the right position.

Shapes: L history, I items, D item-vector width.

Example::

    trigger = LearnedTrigger(load_gate_model(path), GateConfig(budget=0.1), table)  # [I, D]
    decision = trigger.decide(history, st.gate, base_ranks)      # base_ranks: the last <= L
    trigger.on_request(history, st.gate)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from device_ranker.gate import GateConfig, GateDecision, GateState
from device_ranker.learned_gate import GateModel, LearnedGate
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)


class LearnedTrigger:
    """The learned gate as a device trigger (see the module docstring).

    Args:
        model: the learned gate's weights (``load_gate_model``).
        config: budget, window, min_history, min_gap, max_credit; ``threshold`` (when
            set) is the predicted-gain threshold, else the model's for the budget.
        item_vectors: [I, D] the ranker's item table.
    """

    name = "learned"

    def __init__(self, model: GateModel, config: GateConfig, item_vectors: np.ndarray) -> None:
        if len(model.popularity) != len(item_vectors):
            raise ValidationError(
                f"the learned gate was trained for {len(model.popularity)} items, the ranker "
                f"has {len(item_vectors)}: train it for this ranker's dataset "
                "(`recsys replay train-gate`)"
            )
        self.gate = LearnedGate(model, config, item_vectors, threshold=config.threshold)
        self.config = config
        trained = {
            k: model.meta[k] for k in ("window", "min_history", "min_gap") if k in model.meta
        }
        differs = {
            k: (v, getattr(config, k)) for k, v in trained.items() if v != getattr(config, k)
        }
        if differs:  # its thresholds were calibrated under the training settings
            logger.warning(
                "the learned gate was trained with %s; this device runs %s: its request rate "
                "may differ from the budget (--gate-window / --gate-min-history / "
                "--gate-min-gap)",
                trained,
                {k: cur for k, (_, cur) in differs.items()},
            )

    def threshold(self) -> float:
        return self.gate.threshold()

    def decide(
        self, history: Sequence[int], state: GateState, base_ranks: Sequence[float] = ()
    ) -> GateDecision:
        """Decide after the event just appended to ``history`` [L]; ``base_ranks``: the
        base head's ranks of the last <= L clicks (NaN = not ranked), aligned with the
        end of the history."""
        n = len(history)
        if state.anchor is not None:  # the anchor's position in the (bounded) history
            state.anchor = max(n - (state.events_since_request + 1), 0)
        ranks = np.full(n, np.nan)  # [L]
        k = min(len(base_ranks), n)
        if k:
            ranks[n - k :] = np.fromiter(base_ranks, np.float64, len(base_ranks))[-k:]
        return self.gate.decide(history, state, ranks)

    def on_request(self, history: Sequence[int], state: GateState) -> None:
        self.gate.on_request(history, state)
