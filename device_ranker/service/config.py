"""Configuration of the device service (small frozen dataclasses, validated on construction
by pydantic: :func:`recsys.validation.config_dataclass`).

The CLI (``recsys serve device``) fills them from its options; tests build them directly.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from pydantic import Field

from device_ranker.config import AnnConfig
from device_ranker.gate import GateConfig
from device_ranker.guard import GuardConfig
from device_ranker.service.policy import StalenessConfig
from recsys.serving.auth import AuthConfig
from recsys.serving.batching import BatchConfig
from recsys.serving.server import ServerOptions
from recsys.validation import config_dataclass


@config_dataclass
class CloudLinkConfig:
    """How the device talks to the cloud's AdaptationService.

    Attributes:
        target: ``host:port`` of the cloud (None = no cloud: base model only), or several
            replicas: comma-separated ``ip:port`` or a DNS name with several records
            (calls go round_robin over the healthy ones:
            :mod:`device_ranker.service.cloud_link`).
        deadline_s: deadline of one GenerateEdit call; past it the device falls back.
        probe_interval_s: how often the health of the cloud is checked (reachability).
        token_file: file holding this device's signed token (``recsys auth issue``), sent
            as ``authorization: Bearer``; re-read when the file changes, so a reissued
            token needs no restart. The cloud answers only for the token's device id, so
            a device hosting many users (an edge node, a replay) needs an operator token.
        tls_ca: PEM certificate to trust (TLS on); None = plaintext.
        tls_server_name: name to check in the server certificate (default: from target).
        payload_dtype: downlink precision asked for ("fp16", "int8", "fp32").
        recent_items: items of the history sent up with a request (the uplink).
        summary_items: items pooled into the device summary's mean item embedding.
        send_summary: also send the summary vector [2D] (mean recent item embedding +
            user state), which the trained adaptor reads.
        uplink_states: P, also send the ranker's user states before each of the user's
            last P positions (and the items beyond the uplink window those positions
            need), so a cloud that refines edits (issue 13) can optimise on them; 0 = never.
        state_dtype: wire precision of those states ("fp16": 2 bytes per value, "fp32").
    """

    target: str | None = None
    deadline_s: float = Field(1.0, ge=0.001, le=600)
    probe_interval_s: float = Field(1.0, gt=0)
    token_file: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None
    payload_dtype: Literal["fp16", "int8", "fp32"] = "fp16"
    recent_items: int = Field(50, ge=1, le=512)
    summary_items: int = Field(10, ge=1)
    send_summary: bool = True
    uplink_states: int = Field(0, ge=0, le=512)
    state_dtype: Literal["fp16", "fp32"] = "fp16"


@config_dataclass
class DeviceConfig:
    """The device service.

    Attributes:
        checkpoint: the ranker checkpoint (:mod:`device_ranker.train`).
        dataset: dataset name or canonical directory whose users are seeded with their
            history (None = start without users; RecordEvent creates them).
        seed_histories: which events seed the users: "time" (the time split's training
            period), "all" or "none".
        seed_quantile: the time split's quantile for "time".
        history_len: events kept per user (older ones drop; the ranker reads the last T).
        max_k / max_candidates / max_probes: request limits (INVALID_ARGUMENT beyond).
        max_weight_norm / max_bias_abs: edit bounds the device enforces (None = the
            ranker's defaults, :class:`device_ranker.edits.EditBounds`).
        torch_threads: intra-op threads of torch in the server (1: the server overlaps
            requests itself; more threads on a shared machine spin and slow down).
        rank_batch: micro-batching of Recommend (many users ranked in one pass). A 2 ms
            wait measured best on ml-100k (2 cores, shared): bigger batches halve the
            server CPU per call (0.37 vs 0.7 ms) and cut p99 at 1,000 req/s from ~100 ms
            to ~10 ms; with no wait, batches stay at 2-5 calls.
        experiment: name of the experiment whose arms the device serves (reported; the
            arms come from the resolver given to ``start_device``).
        event_log: JSON-lines file every RecordEvent is appended to (None = no log); see
            :mod:`device_ranker.service.event_log`.
        trigger: what makes a device ask the cloud: "gate" (the shift gate) or "timer"
            (every ``round(1 / gate.budget)`` events) or "learned" (the learned gate of
            ``learned_gate``), for users outside an experiment.
        learned_gate: the learned request gate's weights (``.npz`` of ``recsys replay
            train-gate``), needed by ``trigger="learned"``
            (:mod:`device_ranker.service.learned_trigger`).
        guard: the device harm guard (issue 15): a new cloud edit is applied only when
            the user's earlier edits did not rank its later clicks significantly worse
            than the base head (:class:`device_ranker.guard.HarmGuard`,
            ``guard_settings``); otherwise the user is served the base head and the edit
            is kept as the candidate, scored in shadow on the next clicks.
        guard_report: score the clicks (base head vs candidate edit) and report the
            evidence with every GenerateEdit (for the cloud's fleet guard) without the
            device's own test; implied by ``guard``.
        guard_settings: window, margin, min_evidence and z of the device's test.
        staleness: what the device tracks about each user's current edit (age, fit) and
            the optional staleness request rule (off by default):
            :class:`~device_ranker.service.policy.StalenessConfig`.
        auth: the keys whose signed tokens this server's callers must present (none = no
            check): a device token acts for the user whose id is its subject, an operator
            token for any user (see :mod:`device_ranker.service.server`).
        state_path: the durable device state (a SQLite file: every acknowledged event,
            each user's active edit; :mod:`device_ranker.service.state`); None = users live
            in memory only and are lost on restart.
        state_sync: "normal" (a commit survives the process being killed; an OS crash may
            lose the last ones) or "full" (an fsync per commit: survives power loss).
        max_users: users held in memory, least recently used evicted beyond it (reloaded
            from the state file on their next call; without one, their state is lost).
        max_memory_mb: cap on the estimated bytes of the users held (MiB; None = no cap):
            least recently used users are evicted beyond it, as beyond ``max_users``. The
            estimate (:mod:`device_ranker.service.memory`) covers histories, seen sets,
            cached states and scores, edits and their payloads and the per-user overhead,
            not the model or the catalogue.
        ann: the faiss pre-selection for large catalogues (:class:`AnnConfig`: on from
            50,000 items by default; "on" / "off" force it).
        gate / cloud / server: see :class:`GateConfig`, :class:`CloudLinkConfig`,
            :class:`recsys.serving.server.ServerOptions`.
    """

    checkpoint: str
    dataset: str | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    seed_histories: Literal["time", "all", "none"] = "time"
    seed_quantile: float = Field(0.8, gt=0.0, lt=1.0)
    history_len: int = Field(200, ge=1)
    max_k: int = Field(1000, ge=1)
    max_candidates: int = Field(10_000, ge=1)
    max_probes: int = Field(1000, ge=0, le=10_000)
    max_weight_norm: float | None = None
    max_bias_abs: float | None = None
    torch_threads: int = Field(1, ge=1)
    rank_batch: BatchConfig = field(
        default_factory=lambda: BatchConfig(max_batch=64, max_wait_ms=2.0)
    )
    rank_inline: bool = False
    experiment: str | None = None
    event_log: str | None = None
    trigger: Literal["gate", "timer", "learned"] = "gate"
    learned_gate: str | None = None
    guard: bool = False
    guard_report: bool = False
    guard_settings: GuardConfig = field(default_factory=GuardConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    cloud: CloudLinkConfig = field(default_factory=CloudLinkConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    state_path: str | None = None
    state_sync: Literal["normal", "full"] = "normal"
    max_users: int = Field(100_000, ge=1)
    max_memory_mb: float | None = Field(None, gt=0)
    ann: AnnConfig = field(default_factory=AnnConfig)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        if self.trigger == "learned" and not self.learned_gate:
            raise ValueError(
                "trigger 'learned' needs the learned gate's weights (--learned-gate PATH, "
                "from `recsys replay train-gate`)"
            )

    @property
    def scores_guard(self) -> bool:
        """Whether clicks are scored by the base head and the candidate edit."""
        return self.guard or self.guard_report
