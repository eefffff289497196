"""When a device asks for an edit (triggers) and which request serves which event.

A request is identified by the history length ``L`` it was made from (the device's
items ``seq[:L]``). An event at ``position`` p (its history is ``seq[:p]``, its target
``seq[p]``) is served by the latest request with ``L <= p``: the request made right
after event p - 1 was recorded at the earliest, never one that saw the target.

Triggers (all make the first request as soon as the device has ``min_history`` events:
from the starting history for a warm device, right after the ``min_history``-th event
for a new one):

* gate: :class:`device_ranker.gate.ShiftGate` with a fixed, calibrated threshold, run
  exactly as on the device: ``decide`` on the history after each event, ``on_request``
  when it asks;
* learned: :class:`device_ranker.learned_gate.LearnedGate` with the threshold calibrated
  for its budget on the training period, run as on the device; besides the history it
  reads the base model's rank of each click (computed from histories too, never from an
  edit);
* timer with period k: again once ``k`` events have been recorded since the last request.

Triggers see only the histories, never an edit, so every request point of every policy
is known before any edit is made; the engine then builds the edits in batches.

Example::

    lengths = gate_requests(gate, seq, start_len=12)          # int64 [R] request lengths
    lengths = timer_requests(seq_len=40, start_len=0, period=5, min_history=5)
    lengths = learned_requests(learned, seq, start_len=12, base_ranks=ranks)  # ranks [len(seq)]
    served = serving_request(lengths, positions)              # [E] index into lengths or -1
"""

from __future__ import annotations

import numpy as np

from device_ranker.gate import GateState, ShiftGate
from device_ranker.learned_gate import LearnedGate
from recsys.replay.config import PolicySpec

TriggerKey = tuple[str, float]  # ("gate" | "learned", budget) or ("timer", period)


def trigger_key(spec: PolicySpec) -> TriggerKey | None:
    """Policies with equal keys request at the same points (None: never requests).

    Fine-tuning is a timer with period ``finetune_every``; the gate at a 100 % budget
    asks after every event, which is the timer with period 1.
    """
    if spec.kind == "static":
        return None
    if spec.kind == "finetune" or spec.trigger == "timer":
        return ("timer", float(spec.period))
    if spec.budget >= 1.0:
        return ("timer", 1.0)
    return (spec.trigger, float(spec.budget))


def timer_requests(seq_len: int, start_len: int, period: int, min_history: int) -> np.ndarray:
    """History lengths of a timer's requests over a device's replay: int64 [R].

    Decisions happen at the start (``L = start_len``) and after each replay event
    (``L = start_len + 1 .. seq_len``).
    """
    out = []
    last = None
    for length in range(start_len, seq_len + 1):
        if length < min_history:
            continue
        if last is None or length - last >= period:
            out.append(length)
            last = length
    return np.asarray(out, dtype=np.int64)


def gate_requests(gate: ShiftGate, seq: np.ndarray, start_len: int) -> np.ndarray:
    """History lengths of the gate's requests over a device's replay: int64 [R].

    The device runs ``gate.decide`` on its starting history (the first request when it
    already has ``min_history`` events) and on the history after each replay event.
    ``gate`` must have a fixed threshold for the result to depend on this device only.
    """
    state = GateState()
    out = []
    for length in range(start_len, len(seq) + 1):
        history = seq[:length]
        if gate.decide(history, state).request:
            gate.on_request(history, state)
            out.append(length)
    return np.asarray(out, dtype=np.int64)


def learned_requests(
    gate: LearnedGate, seq: np.ndarray, start_len: int, base_ranks: np.ndarray
) -> np.ndarray:
    """History lengths of the learned gate's requests over a device's replay: int64 [R].

    As :func:`gate_requests`; ``base_ranks`` [len(seq)] float: the base model's rank of
    ``seq[p]`` given ``seq[:p]`` (NaN where not computed), of which a decision on
    ``seq[:L]`` reads positions < L only.
    """
    state = GateState()
    out = []
    for length in range(start_len, len(seq) + 1):
        history = seq[:length]
        if gate.decide(history, state, base_ranks[:length]).request:
            gate.on_request(history, state)
            out.append(length)
    return np.asarray(out, dtype=np.int64)


def serving_request(lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For each event position p, the index of the request serving it (latest ``L <= p``),
    -1 when none has been made yet: int64 [E]."""
    return np.searchsorted(lengths, positions, side="right").astype(np.int64) - 1


def triggered_by(lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[E] bool: the event at position p triggered a request (one was made from
    ``seq[:p + 1]``, i.e. right after the event was recorded)."""
    return np.isin(positions + 1, lengths)
