"""Configuration of the device service (small frozen dataclasses, validated on construction).

The CLI (``recsys serve device``) fills them from its options; tests build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from device_ranker.gate import GateConfig
from recsys.errors import ValidationError
from recsys.serving.batching import BatchConfig
from recsys.serving.server import ServerOptions

PAYLOAD_DTYPES = ("fp16", "int8", "fp32")


@dataclass(frozen=True)
class CloudLinkConfig:
    """How the device talks to the cloud's AdaptationService.

    Attributes:
        target: ``host:port`` of the cloud (None = no cloud: base model only).
        deadline_s: deadline of one GenerateEdit call; past it the device falls back.
        probe_interval_s: how often the health of the cloud is checked (reachability).
        token_file: file holding the shared token sent as ``authorization: Bearer``.
        tls_ca: PEM certificate to trust (TLS on); None = plaintext.
        tls_server_name: name to check in the server certificate (default: from target).
        payload_dtype: downlink precision asked for ("fp16", "int8", "fp32").
        recent_items: items of the history sent up with a request (the uplink).
        summary_items: items pooled into the device summary's mean item embedding.
        send_summary: also send the summary vector [2D] (mean recent item embedding +
            user state), which the trained adaptor reads.
    """

    target: str | None = None
    deadline_s: float = 1.0
    probe_interval_s: float = 1.0
    token_file: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None
    payload_dtype: str = "fp16"
    recent_items: int = 50
    summary_items: int = 10
    send_summary: bool = True

    def __post_init__(self) -> None:
        if not 0.001 <= self.deadline_s <= 600:
            raise ValidationError(
                f"cloud deadline must be in [0.001, 600] s, got {self.deadline_s}"
            )
        if self.probe_interval_s <= 0:
            raise ValidationError(f"probe interval must be > 0 s, got {self.probe_interval_s}")
        if self.payload_dtype not in PAYLOAD_DTYPES:
            raise ValidationError(
                f"payload dtype {self.payload_dtype!r} is not one of {list(PAYLOAD_DTYPES)}"
            )
        if not 1 <= self.recent_items <= 512 or self.summary_items < 1:
            raise ValidationError(
                "recent_items must be in 1..512 and summary_items >= 1, got "
                f"{self.recent_items}, {self.summary_items}"
            )


@dataclass(frozen=True)
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
            (every ``round(1 / gate.budget)`` events), for users outside an experiment.
        gate / cloud / server: see :class:`GateConfig`, :class:`CloudLinkConfig`,
            :class:`recsys.serving.server.ServerOptions`.
    """

    checkpoint: str
    dataset: str | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    seed_histories: str = "time"
    seed_quantile: float = 0.8
    history_len: int = 200
    max_k: int = 1000
    max_candidates: int = 10_000
    max_probes: int = 1000
    max_weight_norm: float | None = None
    max_bias_abs: float | None = None
    torch_threads: int = 1
    rank_batch: BatchConfig = field(
        default_factory=lambda: BatchConfig(max_batch=64, max_wait_ms=2.0)
    )
    rank_inline: bool = False
    experiment: str | None = None
    event_log: str | None = None
    trigger: str = "gate"
    gate: GateConfig = field(default_factory=GateConfig)
    cloud: CloudLinkConfig = field(default_factory=CloudLinkConfig)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        if self.seed_histories not in ("time", "all", "none"):
            raise ValidationError(
                f"seed_histories must be 'time', 'all' or 'none', got {self.seed_histories!r}"
            )
        if self.history_len < 1 or self.max_k < 1 or self.max_candidates < 1:
            raise ValidationError("history_len, max_k and max_candidates must be >= 1")
        if self.trigger not in ("gate", "timer"):
            raise ValidationError(f"trigger must be 'gate' or 'timer', got {self.trigger!r}")
        if not 0 <= self.max_probes <= 10_000:
            raise ValidationError(f"max_probes must be in 0..10000, got {self.max_probes}")
        if self.torch_threads < 1:
            raise ValidationError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if not 0.0 < self.seed_quantile < 1.0:
            raise ValidationError(f"seed_quantile must be in (0, 1), got {self.seed_quantile}")
