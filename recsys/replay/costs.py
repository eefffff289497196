"""Cost accounting per policy: device compute, bytes up and down, cloud time.

Per request (or fine-tuning update) a policy records:

* ``decode_us`` + ``apply_us``: measured device time of the update. For a cloud edit,
  decoding the payload (and any prototype download), then composing it with the
  prototype edit, validating and building the (factored) head weights
  (``Ranker.prepare_decoded``); for fine-tuning, 0 + the wall time of
  :func:`device_ranker.finetune.finetune_head` (encoder pass + Adam steps) and making
  its weights;
* ``device_flops``: for a cloud edit, :func:`apply_flops` of the edit it applied (its
  validation and, for large ranks or dense parts only, materialisation) plus
  :func:`event_flops` for every event the edit then scores (the factored head's extra
  ``(x V) A^T``); for fine-tuning, ``FlopCounterMode``'s count (forward + backward);
* ``device_peak_bytes``: for a cloud edit, the head weights it builds (factors, biases,
  materialised layers); for fine-tuning, the profiler's peak of live bytes;
* ``uplink_bytes``: what the device sends (:func:`uplink_bytes`); 0 for fine-tuning;
* ``downlink_bytes``: the RSE1 payload (:mod:`recsys.edit_payload`) + prototype
  downloads; 0 for fine-tuning;
* ``cloud_ms``: LM generation + generator forward (batched per device, divided by the
  batch) + prototype assignment / residual / encoding (per request).

Ranking itself (encoder, head, catalogue scores) costs every policy the same and is
reported once (:func:`scoring_flops`). Through the services (``rpc``), the accumulator
also keeps the ``Recommend`` / ``RecordEvent`` round-trip latencies, the failed edit
requests and the fallback answers.

Example::

    acc = CostAccumulator()
    acc.add(decode_us=150.0, apply_us=40.0, device_flops=2.6e5, uplink_bytes=592, downlink_bytes=3580,
            cloud_ms=4.1)
    acc.summary(evaluated_events=1000)["device_us_per_event"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from device_ranker.edit_apply import keeps_factored
from device_ranker.edits import EditBounds, HeadEdit

if TYPE_CHECKING:
    from recsys.replay.config import ReplayConfig

# int32 item ids, fp32 summary values, (prototype id, version) as two uint32
ID_BYTES, FLOAT_BYTES, PROTOTYPE_REF_BYTES = 4, 4, 8


def uplink_bytes(history_len: int, items: int, summary_dim: int, prototype_ref: bool) -> int:
    """Bytes a request carries: the last ``items`` item ids (int32), the device summary
    (``summary_dim`` fp32 values) and, with prototypes, the (id, version) the device holds."""
    return (
        ID_BYTES * min(history_len, items)
        + FLOAT_BYTES * summary_dim
        + (PROTOTYPE_REF_BYTES if prototype_ref else 0)
    )


def refine_uplink_bytes(history_len: int, cfg: ReplayConfig, dim: int) -> int:
    """What a refine request adds to the uplink: the device's user states before its last
    ``cfg.refine.positions`` positions (fp16, D each) and the item ids beyond the uplink
    window that those positions' targets need (int32): the targets are the last ``p``
    items, of which the uplink already carries ``min(history_len, uplink_items)``."""
    p = min(cfg.refine.positions, max(history_len - 1, 0))
    extra_ids = max(0, p - min(history_len, cfg.uplink_items))
    return 2 * dim * p + ID_BYTES * extra_ids


def apply_flops(
    edit: HeadEdit, spec: Mapping[str, tuple[int, int]], bounds: EditBounds | None = None
) -> int:
    """FLOPs of preparing ``edit`` on the device (``prepare_edit`` / ``prepare_decoded``),
    per layer [out, in] with rank r:

    * low-rank part: ``U * s`` (out r); kept factored
      (:func:`~device_ranker.edit_apply.keeps_factored`): the Gram norm ``A^T A`` (2 out r^2)
      + ``V^T V`` (2 in r^2) + their inner product (2 r^2); else materialised:
      ``A V^T`` (2 out in r);
    * a materialised dW: + dense part (out in, when both), ``||dW||_F`` (2 out in),
      ``W + dW`` (out in); ``max_weight_abs`` (out in) when bounded;
    * bias: ``max |db|`` (2 out) + ``b + db`` (out).

    Composing with a prototype concatenates factors (no FLOPs).
    """
    bounds = bounds or EditBounds()
    total = 0
    for name, le in edit.layers.items():
        out, inp = spec[name]
        r = le.rank
        dense = False
        if r:
            total += out * r
            if keeps_factored(out, inp, r, le.dense is not None, bounds):
                total += 2 * r * r * (out + inp + 1)
            else:
                total += 2 * out * inp * r
                dense = True
        if le.dense is not None:
            total += out * inp if dense else 0
            dense = True
        if dense:
            total += 3 * out * inp + (out * inp if bounds.max_weight_abs is not None else 0)
        if le.bias is not None:
            total += 3 * out
    return total


def event_flops(
    edit: HeadEdit, spec: Mapping[str, tuple[int, int]], bounds: EditBounds | None = None
) -> int:
    """Extra FLOPs of scoring one event with ``edit`` kept factored: per factored layer
    ``x V`` (2 in r) and ``+ (x V) A^T`` (2 r out + out). Materialised layers cost what
    the base head does (counted once for every policy, :func:`scoring_flops`)."""
    bounds = bounds or EditBounds()
    total = 0
    for name, le in edit.layers.items():
        out, inp = spec[name]
        r = le.rank
        if r and keeps_factored(out, inp, r, le.dense is not None, bounds):
            total += 2 * r * (inp + out) + out
    return total


def scoring_flops(dim: int, head: Sequence[tuple[int, int]], num_items: int) -> int:
    """Matmul FLOPs of one event's ranking after the encoder: head layers [out, in] and
    the catalogue scores ``q @ E^T`` (2 D I)."""
    return sum(2 * o * i for o, i in head) + 2 * dim * num_items


@dataclass
class CostAccumulator:
    """Per-request cost lists of one policy (merged across users and workers)."""

    requests: int = 0
    initial_requests: int = 0
    decode_us: list[float] = field(default_factory=list)
    apply_us: list[float] = field(default_factory=list)
    device_flops: list[float] = field(default_factory=list)
    device_peak_bytes: list[float] = field(default_factory=list)
    uplink_bytes: list[float] = field(default_factory=list)
    downlink_bytes: list[float] = field(default_factory=list)
    payload_bytes: list[float] = field(default_factory=list)
    cloud_ms: list[float] = field(default_factory=list)
    prototype_downloads: int = 0
    prototype_bytes: int = 0
    # measured through the gRPC services only (rpc=True)
    rpc: bool = False
    recommend_ms: list[float] = field(default_factory=list)
    record_ms: list[float] = field(default_factory=list)
    failed_requests: int = 0
    fallback_answers: int = 0
    # guarded policies only (recsys.replay.guard): edits applied / kept out, check time
    guard_accepted: int = 0
    guard_rejected: int = 0
    guard_us: list[float] = field(default_factory=list)

    def add(
        self,
        *,
        decode_us: float,
        apply_us: float,
        device_flops: float,
        device_peak_bytes: float = 0.0,
        uplink_bytes: float = 0.0,
        downlink_bytes: float = 0.0,
        payload_bytes: float = 0.0,
        cloud_ms: float = 0.0,
        initial: bool = False,
    ) -> None:
        self.requests += 1
        self.initial_requests += int(initial)
        self.decode_us.append(decode_us)
        self.apply_us.append(apply_us)
        self.device_flops.append(device_flops)
        self.device_peak_bytes.append(device_peak_bytes)
        self.uplink_bytes.append(uplink_bytes)
        self.downlink_bytes.append(downlink_bytes)
        self.payload_bytes.append(payload_bytes)
        self.cloud_ms.append(cloud_ms)

    def merge(self, other: CostAccumulator) -> None:
        self.requests += other.requests
        self.initial_requests += other.initial_requests
        for name in (
            "decode_us",
            "apply_us",
            "device_flops",
            "device_peak_bytes",
            "uplink_bytes",
            "downlink_bytes",
            "payload_bytes",
            "cloud_ms",
            "recommend_ms",
            "record_ms",
            "guard_us",
        ):
            getattr(self, name).extend(getattr(other, name))
        self.prototype_downloads += other.prototype_downloads
        self.prototype_bytes += other.prototype_bytes
        self.rpc = self.rpc or other.rpc
        self.failed_requests += other.failed_requests
        self.fallback_answers += other.fallback_answers
        self.guard_accepted += other.guard_accepted
        self.guard_rejected += other.guard_rejected

    def summary(self, evaluated_events: int) -> dict[str, float]:
        """Totals, per-request means / p50 and per-event device figures (+ with ``rpc``:
        failed requests, fallback answers, call latency p50 / p99, NaN without calls)."""
        n = max(self.requests, 1)
        e = max(evaluated_events, 1)
        device_us = [d + a for d, a in zip(self.decode_us, self.apply_us, strict=True)]

        def total(xs: list[float]) -> float:
            return float(np.sum(xs)) if xs else 0.0

        def p50(xs: list[float]) -> float:
            return float(np.median(xs)) if xs else 0.0

        out = {
            "requests": self.requests,
            "initial_requests": self.initial_requests,
            "device_us_total": total(device_us),
            "device_us_per_request_p50": p50(device_us),
            "device_decode_us_per_request_p50": p50(self.decode_us),
            "device_apply_us_per_request_p50": p50(self.apply_us),
            "device_us_per_event": total(device_us) / e,
            "device_flops_total": total(self.device_flops),
            "device_flops_per_request": total(self.device_flops) / n,
            "device_flops_per_event": total(self.device_flops) / e,
            "device_peak_bytes_max": float(max(self.device_peak_bytes, default=0.0)),
            "uplink_bytes_per_request": total(self.uplink_bytes) / n,
            "uplink_bytes_total": total(self.uplink_bytes),
            "downlink_bytes_per_request": total(self.downlink_bytes) / n,
            "downlink_bytes_total": total(self.downlink_bytes),
            "payload_bytes_per_request": total(self.payload_bytes) / n,
            "prototype_downloads": self.prototype_downloads,
            "prototype_bytes_total": self.prototype_bytes,
            "cloud_ms_per_request_mean": total(self.cloud_ms) / n,
            "cloud_ms_per_request_p50": p50(self.cloud_ms),
            "cloud_ms_total": total(self.cloud_ms),
        }
        if self.guard_us:
            out.update(
                guard_accepted=self.guard_accepted,
                guard_rejected=self.guard_rejected,
                guard_us_per_edit_p50=p50(self.guard_us),
                guard_us_per_edit_mean=total(self.guard_us) / len(self.guard_us),
            )
        if self.rpc:

            def pct(xs: list[float], q: float) -> float:
                return float(np.percentile(xs, q)) if xs else float("nan")

            out.update(
                failed_requests=self.failed_requests,
                fallback_answers=self.fallback_answers,
                recommend_ms_p50=pct(self.recommend_ms, 50),
                recommend_ms_p99=pct(self.recommend_ms, 99),
                record_event_ms_p50=pct(self.record_ms, 50),
                record_event_ms_p99=pct(self.record_ms, 99),
            )
        return out
