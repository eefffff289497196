"""The device's live-traffic event log: one JSON line per RecordEvent (A/B analysis input).

``recsys serve device --event-log PATH`` appends a line for every recorded event, so
``recsys abtest analyze`` can evaluate live traffic the way it evaluates a replay. Each
line is a JSON object with these keys (:data:`FIELDS`):

======================  ==============================================================
``user_id``             the user (device) id
``arm``                 the user's experiment arm ("" without an experiment)
``experiment``          the experiment name ("" without one)
``timestamp``           the event's time (RecordEventRequest.timestamp, unix seconds)
``item_id``             the item the user interacted with
``rank``                1-based rank of that item under the model the user was served just
                        before the event (its edit, or the base model), over the catalogue
                        minus the user's earlier items, ties pessimistic
``num_items``           rankable items at that moment (catalogue minus history)
``history_len``         the user's events before this one (on the device, bounded)
``requested``           whether the event made the device ask the cloud for an edit
``outcome``             not_requested / applied / held / failed / pending / in_flight
``bytes_up``            serialized GenerateEdit request of that edit request, bytes
``bytes_down``          its response (+ a fetched prototype), bytes
``cloud_ms``            the cloud engine's time for it, ms
``mode``                serving mode after the event (base, edited, fallback_*)
``logged_at_ms``        wall clock when the line was written, unix ms
======================  ==============================================================

A background edit request (``wait_for_edit`` false) is logged when it finishes, with its
bytes; lines of one user are in event order.

Example::

    log = EventLog("events.jsonl", experiment="budget-test")
    log.write({"user_id": "u1", ...})
    log.close()
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from recsys.errors import ValidationError
from recsys.serving.redact import id_ref

logger = logging.getLogger(__name__)

FIELDS = (
    "user_id",
    "arm",
    "experiment",
    "timestamp",
    "item_id",
    "rank",
    "num_items",
    "history_len",
    "requested",
    "outcome",
    "bytes_up",
    "bytes_down",
    "cloud_ms",
    "mode",
    "logged_at_ms",
)


class EventCost(Protocol):
    """What an event's line reads of its edit request
    (:class:`device_ranker.service.cloud_edits.FetchResult`)."""

    outcome: str
    bytes_up: int
    bytes_down: int
    cloud_ms: float


class EventLog:
    """Append-only JSON-lines writer (line-buffered; safe from several threads).

    Args:
        path: the file (created with its folder; appended to when it exists).
        experiment: the experiment name written into every line.
    """

    def __init__(self, path: str | Path, experiment: str = "") -> None:
        self.path = Path(path)
        self.experiment = experiment
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        except OSError as exc:
            raise ValidationError(f"cannot open the event log {self.path}: {exc}") from None
        self._lock = threading.Lock()
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        """Write one event (missing keys of :data:`FIELDS` are an error: a bug)."""
        line = {**record, "experiment": self.experiment, "logged_at_ms": int(time.time() * 1000)}
        missing = [k for k in FIELDS if k not in line]
        if missing:
            raise ValueError(f"event log record lacks {missing}")
        text = json.dumps({k: line[k] for k in FIELDS}, separators=(",", ":"))
        with self._lock:
            self._file.write(text + "\n")
            self.lines += 1

    def write_event(self, line: dict[str, Any], cost: EventCost, mode: str) -> None:
        """Write one RecordEvent's line with what its edit request cost and the serving
        mode after it; a failed write is logged, never raised (it must not break serving)."""
        try:
            self.write(
                {
                    **line,
                    "outcome": cost.outcome,
                    "bytes_up": cost.bytes_up,
                    "bytes_down": cost.bytes_down,
                    "cloud_ms": round(cost.cloud_ms, 3),
                    "mode": mode,
                }
            )
        except (OSError, ValueError):  # say so loudly
            logger.exception(
                "could not write the event log line for user %s", id_ref(line["user_id"])
            )

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
