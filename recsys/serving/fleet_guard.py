"""The cloud's fleet guard: apply or hold a device's new edit on the evidence of every device.

Each device that runs a harm guard (``recsys serve device --guard`` or ``--guard-report``)
scores its clicks by the base head and by the candidate edit it held when the click
happened and reports, with every GenerateEdit, its **cumulative** evidence: count n_u,
sum s_u and sum of squares q_u of its per-click gain differences
``d = 1/log2(1 + rank_edit) - 1/log2(1 + rank_base)`` (``device_ranker.guard``). A report
REPLACES the device's previous one, so a retried or duplicated request counts once and the
pooled figures are always "the latest report of every device". :class:`FleetEvidence`
keeps the pooled sums as running totals, O(1) per report:

    N = sum_u n_u,  S = sum_u s_u,  Q = sum_u q_u
    C_ss = sum_u s_u^2,  C_sn = sum_u s_u n_u,  C_nn = sum_u n_u^2     (clustered sums)

and decides, as the offline replay does (``recsys.replay.guard.apply_fleet_guards``):

* ``harm``: hold when the pooled clicks show significant harm, apply otherwise (and with
  fewer than ``min_evidence`` clicks): ``mean + z * sd / sqrt(N) >= -margin``, the
  per-click test of :func:`harm_test`;
* ``proof`` (opt-in): apply only when the pooled clicks show edits HELP, with the clicks
  clustered by device: ``mean - z * se > margin`` with
  ``se^2 = (C_ss - 2 mean C_sn + mean^2 C_nn) / N^2``
  (:func:`benefit_test`), at least ``min_evidence`` clicks and at
  least ``min_devices`` reporting devices (with one device the clustered variance is 0, so
  one device could prove a benefit alone: the replay never meets that case, a fresh
  service does). Without evidence the answer is hold.

This module is below both sides (the cloud must not import ``device_ranker``), so the two
tests live here and :mod:`device_ranker.guard` and the replay use them; the test
``tests/llm_cloud/service/test_fleet_guard.py`` checks the pooled sums against the
replay's clustered sums.

The pooled state is in memory, per cloud replica (each replica pools the reports it
received; with round-robin every device's latest report reaches each replica within a
few requests) and is lost on restart: the devices' next reports rebuild it.

Example::

    fleet = FleetEvidence(FleetGuardConfig(mode="proof"))
    fleet.report("u1", clicks=20, total=0.8, squares=0.2)
    fleet.decide()            # "hold" (one device, or too little evidence) / "apply"
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from recsys.errors import ValidationError
from recsys.validation import config_dataclass

APPLY = "apply"
HOLD = "hold"


@config_dataclass
class FleetGuardConfig:
    """The cloud's fleet guard (fixed a priori, the device guard's defaults).

    Attributes:
        mode: "off" (no decision: devices apply), "harm" (hold on significant pooled
            harm) or "proof" (apply only on a significant pooled benefit).
        margin / min_evidence / z: as :class:`device_ranker.guard.GuardConfig`.
        min_devices: proof mode needs reports from at least this many devices.
        max_devices: devices whose reports are kept in memory; a new device beyond it
            drops the least recently reporting device's report from the pool.
    """

    mode: Literal["off", "harm", "proof"] = "off"
    margin: float = Field(0.0, ge=0.0)
    min_evidence: int = Field(3, ge=0)
    z: float = Field(1.645, ge=0.0)
    min_devices: int = Field(2, ge=1)
    max_devices: int = Field(1_000_000, ge=1)


class FleetEvidence:
    """The pooled evidence of one cloud replica and its decisions (module docstring)."""

    def __init__(self, config: FleetGuardConfig) -> None:
        self.config = config
        self._devices: dict[str, tuple[float, float, float]] = {}  # id -> (n, s, q), oldest first
        self.n = self.s = self.q = 0.0
        self.c_ss = self.c_sn = self.c_nn = 0.0
        self.devices = 0  # devices with at least one scored click
        self.decisions = {APPLY: 0, HOLD: 0}

    def report(self, device_id: str, clicks: int, total: float, squares: float) -> None:
        """Replace ``device_id``'s evidence with its cumulative (n, sum, sum of squares);
        ValidationError for evidence no device can have (non-finite, |d| >= 1 implied,
        sum^2 > n * squares)."""
        n, s, q = float(clicks), float(total), float(squares)
        if not (math.isfinite(s) and math.isfinite(q)):
            raise ValidationError("guard_evidence: gain_diff_sum and _squares must be finite")
        tol = 1e-9 * max(n, 1.0)
        if n < 0 or q < -tol or q > n + tol or abs(s) > n + tol or s * s > n * q + tol * (1 + n):
            raise ValidationError(
                f"guard_evidence is inconsistent (clicks {clicks}, sum {total:g}, sum of "
                f"squares {squares:g}): each click's gain difference is in (-1, 1), so "
                "|sum| <= clicks, sum_squares <= clicks and sum^2 <= clicks * sum_squares"
            )
        old = self._devices.pop(device_id, None)
        if old is not None:
            self._add(*old, sign=-1.0)
        elif len(self._devices) >= self.config.max_devices:
            oldest = next(iter(self._devices))
            self._add(*self._devices.pop(oldest), sign=-1.0)
        self._devices[device_id] = (n, s, q)
        self._add(n, s, q, sign=1.0)

    def _add(self, n: float, s: float, q: float, sign: float) -> None:
        self.devices += int(sign) if n > 0 else 0
        self.n += sign * n
        self.s += sign * s
        self.q += sign * q
        self.c_ss += sign * s * s
        self.c_sn += sign * s * n
        self.c_nn += sign * n * n

    @property
    def mean(self) -> float:
        """Pooled mean gain difference per click (NaN without clicks)."""
        return self.s / self.n if self.n > 0.5 else float("nan")

    def clustered_var(self) -> float:
        """Variance of the pooled mean with clicks clustered by device."""
        if self.n < 0.5:
            return 0.0
        m = self.s / self.n
        return max(self.c_ss - 2.0 * m * self.c_sn + m * m * self.c_nn, 0.0) / self.n**2

    def decide(self) -> str | None:
        """ "apply" / "hold" under the configured mode (None when the mode is off)."""
        cfg = self.config
        if cfg.mode == "off":
            return None
        n = round(self.n)
        if cfg.mode == "harm":
            ok = bool(harm_test(self.s, self.q, n, cfg))
        else:
            ok = self.devices >= cfg.min_devices and bool(
                benefit_test(self.s, n, self.clustered_var(), cfg)
            )
        decision = APPLY if ok else HOLD
        self.decisions[decision] += 1
        return decision


def harm_test(total, squares, n, cfg):
    """The harm test from the evidence's sum, sum of squares and count (any shape): True =
    apply unless ``mean + z * se < -margin`` (se with the n - 1 variance, 0 for one click);
    with fewer than ``min_evidence`` clicks, apply. The device runs it on its own clicks
    (:mod:`device_ranker.guard`), the cloud and the replay on every device's pooled clicks.
    ``cfg`` has ``min_evidence``, ``z`` and ``margin`` (a GuardConfig or FleetGuardConfig)."""
    n = np.asarray(n, dtype=np.float64)
    m = np.maximum(n, 1.0)
    mean = total / m
    var = np.maximum(squares - m * mean * mean, 0.0) / np.maximum(n - 1.0, 1.0)
    ok = mean + cfg.z * np.sqrt(var / m) >= -cfg.margin - 1e-12  # float sums: ties accept
    return (n < max(cfg.min_evidence, 1)) | ok


def benefit_test(total, n, clustered_var, cfg):
    """The opt-in test of the proof guard (any shape): True = apply only when the pooled
    evidence shows the edits HELP, ``mean - z * se > margin``, with at least
    ``min_evidence`` clicks. ``clustered_var`` is the variance of the mean with the clicks
    clustered by device, so one device's many correlated clicks cannot prove a benefit
    alone. Without evidence the answer is no: the device keeps the base head."""
    n = np.asarray(n, dtype=np.float64)
    mean = np.asarray(total, dtype=np.float64) / np.maximum(n, 1.0)
    se = np.sqrt(np.maximum(clustered_var, 0.0))
    return (n >= max(cfg.min_evidence, 1)) & (mean - cfg.z * se > cfg.margin)
