"""The learned request gate: a tiny model that predicts how much a fresh edit would help.

IntellectReq's mis-recommendation detector (WWW'24), as a device can run it: a small model
trained in the cloud on the training period maps signals the device already holds, with
no label from the future, to the **expected gain** of asking for a new edit now over
keeping the edit it has (``recsys.replay.gate_training`` trains it). The device asks
when the predicted gain reaches a threshold calibrated per budget on the training period
(as the shift gate's), under the same first request, cooldown and per-device request
credit as :class:`device_ranker.gate.ShiftGate`.

Features (F = 7, in :data:`FEATURES` order), of a device with history ``seq[:L]`` whose
last request was made from ``seq[:A]`` (``A`` = anchor length):

    shift         (1 - cos(v(last W items), v(items W before A))) / 2   (the shift gate's)
    log_since     log(1 + L - A)                      events since the last request
    log_length    log(1 + L)                          history length
    recent_rank   mean of r(p) over the last K clicks
    since_rank    mean of r(p) over the clicks since the last request (at most S)
    popularity    mean normalised log training-count of the last W items
    shift_since   shift * log_since

with ``r(p) = log(1 + rank_base(seq[p] | seq[:p])) / log(1 + I)`` the BASE model's
normalised log-rank of the user's click at position p (seen items excluded): the
mis-recommendation signal. The device ranks every event anyway; the base rank needs the
base head's scores beside the edited ones (one extra head pass and catalogue product per
event). Ranks under the CURRENT edit, the edit's norm and the prototype distance are left
out: they depend on the edits, which the replay builds after every request point is
known (see ``recsys/replay/policies.py``).

The model ships as plain numpy arrays (``.npz``: standardisation, 0 or 1 hidden ReLU
layer, thresholds per budget; :func:`save_gate_model` / :func:`load_gate_model`): the
device needs numpy only, no cloud package.

Shapes: N rows, F features, H hidden units, I items, D item-vector width, L history.

Example::

    model = load_gate_model(path)                                # GateModel
    gate = LearnedGate(model, GateConfig(budget=0.1), item_vectors=table)  # [I, D]
    state = GateState()
    ranks = np.full(len(history), np.nan); ranks[-3:] = [4, 120, 9]   # base ranks [L]
    decision = gate.decide(history, state, ranks)    # GateDecision(request, score, ...)
    if decision.request:
        gate.on_request(history, state)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_ranker.gate import GateConfig, GateDecision, GateState, ShiftGate
from recsys.errors import NotFoundError, ValidationError

FEATURES = (
    "shift",
    "log_since",
    "log_length",
    "recent_rank",
    "since_rank",
    "popularity",
    "shift_since",
)
RECENT_CLICKS = 3  # K: clicks in recent_rank
SINCE_CLICKS = 20  # S: at most this many clicks in since_rank
FORMAT = "learned-gate-v1"


def feature_matrix(
    shift: np.ndarray,
    since: np.ndarray,
    length: np.ndarray,
    recent_rank: np.ndarray,
    since_rank: np.ndarray,
    popularity: np.ndarray,
) -> np.ndarray:
    """The [N, F] feature rows from their ingredients, each [N] (see the module docstring)."""
    log_since = np.log1p(np.asarray(since, dtype=np.float64))
    shift = np.asarray(shift, dtype=np.float64)
    cols = [
        shift,
        log_since,
        np.log1p(np.asarray(length, dtype=np.float64)),
        np.asarray(recent_rank, dtype=np.float64),
        np.asarray(since_rank, dtype=np.float64),
        np.asarray(popularity, dtype=np.float64),
        shift * log_since,
    ]
    return np.stack(cols, axis=1)  # [N, F]


def normalised_log_rank(ranks: np.ndarray, num_items: int) -> np.ndarray:
    """``log(1 + rank) / log(1 + I)`` in (0, 1]; NaN stays NaN (unknown rank)."""
    return np.log1p(np.asarray(ranks, dtype=np.float64)) / np.log1p(num_items)


@dataclass
class GateModel:
    """The learned gate's plain weights.

    Attributes:
        mean, std: [F] feature standardisation.
        layers: [(W [in, out], b [out])]: ReLU between layers, the last one [*, 1] gives
            the predicted gain.
        popularity: [I] normalised log training-period count of each item, in [0, 1].
        thresholds: budget -> predicted-gain threshold calibrated on the training period.
        train_rates: budget -> request rate that threshold gave on the training period.
        meta: what it was trained on and how (dataset fingerprint, label, settings).
    """

    mean: np.ndarray
    std: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]
    popularity: np.ndarray
    thresholds: dict[float, float] = field(default_factory=dict)
    train_rates: dict[float, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = len(FEATURES)
        if self.mean.shape != (f,) or self.std.shape != (f,):
            raise ValidationError(f"gate model: mean/std must be [{f}], got {self.mean.shape}")
        width = f
        for i, (w, b) in enumerate(self.layers):
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise ValidationError(f"gate model: layer {i} has shapes {w.shape}, {b.shape}")
            width = w.shape[1]
        if width != 1:
            raise ValidationError(f"gate model: the last layer must give 1 output, got {width}")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted gains [N] of feature rows ``x`` [N, F]."""
        h = (np.asarray(x, dtype=np.float64) - self.mean) / self.std  # [N, F]
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b  # [N, out]
            if i + 1 < len(self.layers):
                h = np.maximum(h, 0.0)
        return h[:, 0]

    def threshold(self, budget: float) -> float:
        """The calibrated threshold of ``budget`` (NotFoundError naming the command)."""
        for b, t in self.thresholds.items():
            if abs(b - budget) < 1e-9:
                return t
        raise NotFoundError(
            f"the learned gate has no threshold for budget {budget:g} (it has "
            f"{sorted(self.thresholds)}); retrain it with `recsys replay train-gate "
            f"--budgets ...`"
        )


def save_gate_model(model: GateModel, path: str | Path) -> Path:
    """Write ``model`` as a plain ``.npz`` (no pickles)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "mean": model.mean,
        "std": model.std,
        "popularity": model.popularity.astype(np.float32),
        "budgets": np.array(sorted(model.thresholds), dtype=np.float64),
        "thresholds": np.array([model.thresholds[b] for b in sorted(model.thresholds)]),
        "train_rates": np.array(
            [model.train_rates.get(b, np.nan) for b in sorted(model.thresholds)]
        ),
        "meta": np.array(json.dumps({"format": FORMAT, "features": FEATURES, **model.meta})),
    }
    for i, (w, b) in enumerate(model.layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = w, b
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_gate_model(path: str | Path) -> GateModel:
    """Read a model written by :func:`save_gate_model` (numpy only)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(
            f"no learned gate at {path}; train it with `recsys replay train-gate --dataset NAME`"
        )
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT or tuple(meta.get("features", ())) != FEATURES:
            raise ValidationError(f"{path} is not a {FORMAT} file with features {FEATURES}")
        layers = []
        while f"w{len(layers)}" in z:
            i = len(layers)
            layers.append((z[f"w{i}"].astype(np.float64), z[f"b{i}"].astype(np.float64)))
        budgets = z["budgets"].tolist()
        return GateModel(
            mean=z["mean"].astype(np.float64),
            std=z["std"].astype(np.float64),
            layers=layers,
            popularity=z["popularity"].astype(np.float64),
            thresholds=dict(zip(budgets, z["thresholds"].tolist(), strict=True)),
            train_rates=dict(zip(budgets, z["train_rates"].tolist(), strict=True)),
            meta={k: v for k, v in meta.items() if k not in ("format", "features")},
        )


class LearnedGate:
    """The learned request gate of one budget (see the module docstring).

    Same decisions and reasons as :class:`ShiftGate` ("first", "shift", "below",
    "cooldown", "budget", "short"), with the predicted gain as the score.

    Args:
        model: the :class:`GateModel`.
        config: budget, window W, min_history, min_gap, max_credit (its ``threshold`` is
            ignored: the threshold is ``threshold`` or the model's for the budget).
        item_vectors: [I, D] the ranker's item table (the shift feature).
        threshold: a fixed predicted-gain threshold (None = ``model.threshold(budget)``;
            a budget of 1 asks at every event).
    """

    def __init__(
        self,
        model: GateModel,
        config: GateConfig,
        item_vectors: np.ndarray,
        threshold: float | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.shift = ShiftGate(dataclasses.replace(config, threshold=None), item_vectors)
        # anchor window (its W item ids, as bytes) -> its summary [D]: a device's anchor is
        # the same window at every decision until its next request
        self._anchors: dict[bytes, np.ndarray | frozenset[int]] = {}
        if threshold is None:
            threshold = -np.inf if config.budget >= 1.0 else model.threshold(config.budget)
        self._threshold = float(threshold)

    def threshold(self) -> float:
        return self._threshold

    def features(
        self, history: Sequence[int], base_ranks: np.ndarray, anchor_len: int
    ) -> np.ndarray:
        """The [1, F] feature row of a device with ``history`` [L], the base ranks of its
        clicks ``base_ranks`` [L] (NaN where unknown) and last request at ``anchor_len``."""
        seq = np.asarray(history, dtype=np.int64)
        n = len(seq)
        w = self.config.window
        anchor = self._anchor_summary(seq[max(anchor_len - w, 0) : anchor_len])
        now = self.shift.window_summary(seq)
        shift = float(np.clip((1.0 - np.dot(now, anchor)) / 2.0, 0.0, 1.0))
        tail = max(n - max(RECENT_CLICKS, SINCE_CLICKS), 0)  # the clicks the two means read
        lr = normalised_log_rank(base_ranks[tail:n], len(self.model.popularity))
        recent = _nanmean(lr[max(n - RECENT_CLICKS, 0) - tail :])
        since = _nanmean(lr[max(anchor_len, n - SINCE_CLICKS) - tail :])
        pop = float(self.model.popularity[seq[max(n - w, 0) :]].mean()) if n else 0.0
        return feature_matrix([shift], [n - anchor_len], [n], [recent], [since], [pop])

    def _anchor_summary(self, window: np.ndarray) -> np.ndarray | frozenset[int]:
        """The shift gate's summary of the anchor window [<= W], cached by its item ids."""
        key = window.tobytes()
        got = self._anchors.get(key)
        if got is None:
            if len(self._anchors) >= _MAX_ANCHORS:
                self._anchors.clear()
            got = self._anchors[key] = self.shift.window_summary(window)
        return got

    def decide(
        self, history: Sequence[int], state: GateState, base_ranks: np.ndarray
    ) -> GateDecision:
        """Score the event just appended to ``history`` (``base_ranks`` [L]: the base
        model's rank of each click at its position) and decide; call :meth:`on_request`
        when the request is sent. ``state.anchor`` holds the anchor length."""
        cfg = self.config
        state.events_since_request += 1
        if len(history) < cfg.min_history:
            return GateDecision(False, 0.0, self._threshold, "short")
        if state.anchor is None:
            return GateDecision(True, np.inf, self._threshold, "first")
        if cfg.budget < 1.0:
            state.credit = min(state.credit + cfg.budget, cfg.max_credit)
        if state.events_since_request < cfg.min_gap:
            return GateDecision(False, state.last_score, self._threshold, "cooldown")
        x = self.features(history, np.asarray(base_ranks, dtype=np.float64), int(state.anchor))
        score = float(self.model.predict(x)[0])
        state.last_score = score
        if score < self._threshold:
            return GateDecision(False, score, self._threshold, "below")
        if cfg.budget < 1.0 and state.credit < 1.0:
            return GateDecision(False, score, self._threshold, "budget")
        return GateDecision(True, score, self._threshold, "shift")

    def on_request(self, history: Sequence[int], state: GateState) -> None:
        """A request was sent from ``history``: it becomes the anchor (its length)."""
        if state.anchor is not None and self.config.budget < 1.0:
            state.credit -= 1.0
        state.anchor = len(history)  # the anchor LENGTH (an int, unlike the shift gate's)
        state.events_since_request = 0


_MAX_ANCHORS = 65_536  # cached anchor summaries per gate (~0.3 KB each at D = 64)


def _nanmean(x: np.ndarray) -> float:
    """Mean of the finite values; 0.5 (mid-catalogue) when there are none."""
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else 0.5
