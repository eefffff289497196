"""``recsys serve cloud``, ``recsys serve device`` and ``recsys bench serve``: the gRPC services.

recsys serve cloud  [--engine artifacts|tiny] [--dataset ml-100k] [--adaptor PATH] [--port N]
                    [--auth-key FILE ...] ...
recsys serve device [--checkpoint PATH] [--dataset ml-100k] [--cloud HOST:PORT] [--port N]
                    [--cloud-token-file FILE] [--auth-key FILE ...]
                    [--experiment FILE --event-log PATH] ...
recsys bench serve  [--dataset ml-100k] [--concurrency 32] [--duration 10] [--rate 1000] [--json PATH]

Both servers bind 127.0.0.1 by default, answer the standard health check (NOT_SERVING
until their models are loaded) and server reflection, and stop gracefully on SIGTERM.
Both take ``--config FILE.toml`` (every option as a key; flags override the file:
:mod:`recsys.cli.config_file`, examples in ``examples/cloud.toml`` and
``examples/device.toml``), ``--metrics-port N`` (Prometheus metrics at
``http://HOST:N/metrics``) and ``--trace console|otlp`` (OpenTelemetry spans).
The load benchmark itself is :mod:`recsys.workflows.serve_bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any, TypeVar

from recsys.cli.common import add_json_option, add_location_options
from recsys.cli.config_file import add_config_option
from recsys.reporting import write_json

logger = logging.getLogger(__name__)

DTYPES = ("fp16", "int8", "fp32")
T = TypeVar("T")


def _opt(g: Any, flag: str, default: Any, help: str, **kw: Any) -> None:
    """An option whose type is its default's and whose help ends with the default."""
    g.add_argument(
        flag, type=type(default), default=default, help=f"{help} (default {default})", **kw
    )


def _add_dataset(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dataset", default="ml-100k", help=f"{what} (default ml-100k)")


def _add_dtype(g: Any, help: str) -> None:
    g.add_argument("--payload-dtype", choices=DTYPES, default="fp16", help=f"{help} (default fp16)")


def _add_batching(g: Any, flags: tuple[str, str], defaults: tuple[int, float], what: str) -> None:
    """A micro-batcher's two options: calls per engine pass, wait for more (ms)."""
    _opt(g, flags[0], defaults[0], f"{what} per engine pass at most (1 = micro-batching off)")
    _opt(g, flags[1], defaults[1], "how long a batch waits for more calls, ms")


def _from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """``cls(...)`` from the options named like its fields, then ``given`` (which wins)."""
    named = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    return cls(**{**named, **given})


def _batch(max_batch: int, wait_ms: float) -> Any:
    from recsys.serving.batching import BatchConfig

    return BatchConfig(max_batch=max_batch, max_wait_ms=wait_ms)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``cloud`` and ``device`` to ``serve`` and ``serve`` to ``bench``."""
    _register_cloud(groups["serve"])
    _register_device(groups["serve"])
    _register_bench(groups["bench"])
    _register_state_bench(groups["bench"])


def _register_cloud(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cloud",
        help="run the cloud AdaptationService (LM tokens -> adaptor -> prototype-relative edits)",
        description="Serve recsys.cloud.v1.AdaptationService: GenerateEdit (micro-batched), "
        "GetPrototype, ListPrototypes, plus health checking and reflection. The 'artifacts' "
        "engine loads `recsys train adaptor`'s artefact (adaptor, prototypes, store) and the "
        "codebook LM when the adaptor was trained on its tokens; 'tiny' is an untrained toy "
        "engine over a dataset's catalogue, for tests and smoke runs.",
    )
    p.add_argument(
        "--engine", choices=("artifacts", "tiny"), default="artifacts", help="(default artifacts)"
    )
    _add_dataset(p, "dataset: locates the artefacts, or the tiny engine's catalogue")
    p.add_argument(
        "--adaptor", help="adaptor artefact (default CACHE_DIR/artifacts/NAME/adaptor/adaptor.pt)"
    )
    p.add_argument("--codebook-dir", help="semantic IDs (default: artifacts/NAME/codebook)")
    p.add_argument("--lm-dir", help="codebook LM (default: artifacts/NAME/lm)")
    p.add_argument(
        "--lm-backend",
        default="transformers",
        choices=("transformers", "vllm", "openai"),
        help="how the LM runs (default transformers; vllm needs .venv-vllm)",
    )
    p.add_argument("--lm-url", help="OpenAI-compatible server URL for --lm-backend openai")
    p.add_argument(
        "--store-url",
        help="prototype store URL (default: the store the adaptor training wrote; tiny: none)",
    )
    p.add_argument(
        "--no-prototypes", action="store_true", help="send absolute edits (no prototype bank)"
    )
    p.add_argument(
        "--refine",
        action="store_true",
        help="refine the adaptor's edit of a request that carries the device's recent user "
        "states (codebook.refine; sent whole, no prototype)",
    )
    _opt(p, "--refine-steps", 5, "Adam steps of --refine")
    _opt(p, "--refine-lr", 1e-3, "learning rate of --refine")
    _opt(p, "--refine-positions", 30, "recent positions --refine optimises on")
    p.add_argument(
        "--head-spec",
        default="fc0=128x64,fc1=64x128",
        help="tiny engine: the ranker head, 'fc0=OUTxIN,fc1=OUTxIN' (default: ml-100k's)",
    )
    _opt(p, "--seed", 0, "tiny engine seed")
    _add_batching(p, ("--batch-max", "--batch-wait-ms"), (32, 5.0), "GenerateEdit calls")
    _add_dtype(p, "edit precision when a request does not choose")
    g = p.add_argument_group(
        "store writes (codebook.store.writer)",
        "With a store, GenerateEdit answers from memory; device assignments, refinements "
        "and edit-log rows go through a bounded queue to a writer thread (own connection) "
        "that writes them in batched transactions and retries transient errors. A full "
        "queue makes a write wait --writer-full-wait-ms, then drops it (counted).",
    )
    g.add_argument(
        "--no-write-behind",
        action="store_true",
        help="write in the GenerateEdit batch instead (the old path; a locked store then "
        "delays edits)",
    )
    _opt(g, "--writer-queue", 10_000, "writes queued at most")
    _opt(g, "--writer-full-wait-ms", 20.0, "how long a write waits for room in a full queue, ms")
    _opt(g, "--writer-batch", 256, "writes per transaction at most")
    _opt(g, "--writer-attempts", 20, "tries of a transaction on transient errors")
    g = p.add_argument_group(
        "fleet guard (recsys.serving.fleet_guard)",
        "Pool the harm-guard evidence devices report with GenerateEdit (--guard / "
        "--guard-report on the device; in memory, per replica) and answer each edit with "
        "apply or hold: harm = hold on significant pooled harm; proof = apply only on a "
        "significant pooled benefit (clicks clustered by device). Default off.",
    )
    g.add_argument("--fleet-guard", choices=("off", "harm", "proof"), default="off",
                   help="(default off)")  # fmt: skip
    _opt(g, "--fleet-guard-z", 1.645, "standard errors of significance")
    _opt(g, "--fleet-guard-min-devices", 2, "proof: reporting devices needed")
    _add_auth_options(p, "A device token may ask edits for its own device id only")
    _add_server_options(p, default_port=50051)
    add_location_options(p)
    add_config_option(p)
    p.set_defaults(handler=cmd_serve_cloud)


def _register_device(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "device",
        help="run the device RecommendationService (TorchRec ranker + edits + request gate)",
        description="Serve recsys.device.v1.RecommendationService: Recommend (micro-batched, "
        "per-user edits), RecordEvent (request gate -> GenerateEdit on the cloud with a "
        "deadline), GetStatus, ApplyEdit, plus health checking and reflection. Users are "
        "seeded with their training-period history from --dataset. When the cloud is slow "
        "or down, users keep their last good edit (or the base model) and responses say so. "
        "With --experiment, each user's arm (static, or adapted with its trigger and budget) "
        "comes from the experiment's hash assignment, persisted in the store; --event-log "
        "records every event for `recsys abtest analyze --events`.",
    )
    p.add_argument(
        "--checkpoint",
        help="ranker checkpoint (default CACHE_DIR/artifacts/NAME/ranker-time.pt, else ranker.pt)",
    )
    _add_dataset(p, "dataset whose users are seeded")
    p.add_argument(
        "--seed-histories",
        choices=("time", "all", "none"),
        default="time",
        help="events that seed the users' histories (default time: the training period)",
    )
    _opt(p, "--seed-quantile", 0.8, "time split quantile")
    _opt(p, "--history-len", 200, "events kept per user")
    _opt(p, "--max-k", 1000, "largest k")
    _opt(p, "--max-candidates", 10_000, "largest candidate list")
    p.add_argument("--max-weight-norm", type=float, help="edit bound ||dW||_F per layer")
    p.add_argument("--max-bias-abs", type=float, help="edit bound max |db|")
    _add_batching(p, ("--rank-batch", "--rank-wait-ms"), (64, 2.0), "Recommend calls")
    p.add_argument(
        "--rank-inline",
        action="store_true",
        help="rank on the event loop's thread instead of a worker thread",
    )
    g = p.add_argument_group("request gate (device_ranker.gate)")
    _opt(g, "--gate-budget", 0.2, "target request rate per event")
    _opt(g, "--gate-window", 10, "recent window, events")
    _opt(g, "--gate-min-history", 5, "events before a first request")
    _opt(g, "--gate-min-gap", 5, "events between requests")
    g.add_argument(
        "--gate-threshold",
        type=float,
        help="fixed shift threshold in [0, 1] (overrides the budget)",
    )
    g.add_argument(
        "--gate-trigger",
        choices=("gate", "timer", "learned"),
        default="gate",
        help="gate: the shift gate; timer: a request every round(1/budget) events, "
        "the baseline the gate must beat; learned: the learned gate of --learned-gate "
        "(`recsys replay train-gate`; its threshold for --gate-budget, or --gate-threshold "
        "as the predicted-gain threshold) (default gate)",
    )
    g.add_argument(
        "--learned-gate",
        help="the learned gate's weights for --gate-trigger learned (default: the one "
        "*.learned_gate.npz beside the adaptor artefact in CACHE_DIR/artifacts/NAME/adaptor)",
    )
    g = p.add_argument_group(
        "harm guard (device_ranker.guard)",
        "Score each click by the base head and the user's candidate edit; apply a new edit "
        "only when the user's earlier edits did not rank its later clicks significantly "
        "worse (else serve the base head, keep the edit as the candidate). An edit the "
        "cloud's fleet guard answers with hold is always held.",
    )
    g.add_argument("--guard", action="store_true", help="run the device's harm test")
    g.add_argument(
        "--guard-report",
        action="store_true",
        help="score the clicks and report the evidence to the cloud's fleet guard without "
        "the device's own test (implied by --guard)",
    )
    _opt(g, "--guard-window", 20, "the user's last clicks the device's test averages")
    _opt(g, "--guard-z", 1.645, "standard errors of significance (0: on the mean alone)")
    g = p.add_argument_group("staleness of the edit (device_ranker.service.policy)")
    _opt(g, "--fit-clicks", 5, "clicks whose ranks make the fit signal (0 = off)")
    g.add_argument(
        "--fit-every-click",
        action="store_true",
        help="also rank clicks no Recommend preceded (one scoring pass each)",
    )
    g.add_argument("--stale-events", type=int, help="request when the edit is this many events old")
    g.add_argument("--stale-seconds", type=float, help="request when the edit is this old, s")
    g.add_argument(
        "--stale-fit-mrr",
        type=float,
        help="request when the fit MRR of the last clicks drops below",
    )
    g = p.add_argument_group("link to the cloud")
    g.add_argument(
        "--cloud",
        help="cloud host:port (default: none, base model only); several replicas: "
        "comma-separated ip:port (127.0.0.1:50051,127.0.0.1:50052) or one DNS name with "
        "several records; calls go round_robin over the replicas whose health is SERVING",
    )
    _opt(g, "--cloud-deadline", 1.0, "GenerateEdit deadline, s")
    _opt(g, "--probe-interval", 1.0, "cloud health probe period, s")
    g.add_argument(
        "--cloud-token-file",
        help="this device's signed token (`recsys auth issue`) sent to the cloud; re-read "
        "when the file changes. The cloud answers only for the token's device id: a server "
        "hosting many users needs an operator token",
    )
    g.add_argument("--cloud-tls-ca", help="trust this PEM for the cloud's TLS certificate (TLS on)")
    g.add_argument("--cloud-tls-name", help="name expected in the cloud's certificate")
    _add_dtype(g, "downlink precision")
    g.add_argument(
        "--no-summary", action="store_true", help="send only item ids up (no summary vector)"
    )
    _opt(g, "--recent-items", 50, "recent item ids a GenerateEdit request carries")
    _opt(g, "--summary-items", 10, "recent items pooled into the summary vector")
    _opt(
        g,
        "--uplink-states",
        0,
        "also send the ranker's user states before the user's last N positions (for a "
        "cloud started with --refine; 0 = never)",
    )
    g.add_argument(
        "--state-dtype",
        choices=("fp16", "fp32"),
        default="fp16",
        help="wire precision of --uplink-states (default fp16)",
    )
    g = p.add_argument_group("A/B experiment and evaluation")
    g.add_argument(
        "--experiment",
        metavar="FILE",
        help="serve an experiment (recsys abtest file): each user's arm (hashed from "
        "the salt, persisted in the store) decides static vs adapted and its gate budget",
    )
    g.add_argument(
        "--store-url",
        help="store of the experiment's arm assignments (default: RECSYS_DATABASE_URL "
        "or CACHE_DIR/store.sqlite)",
    )
    g.add_argument(
        "--event-log",
        metavar="PATH",
        help="append one JSON line per RecordEvent (user, arm, item, its rank under the "
        "served model, request, bytes) for `recsys abtest analyze`",
    )
    _opt(g, "--max-probes", 1000, "largest probe list of a Recommend (evaluation scores and ranks)")
    g = p.add_argument_group(
        "durable state (device_ranker.service.state)",
        "Every acknowledged RecordEvent is committed to a local SQLite file first, and each "
        "user's active edit (with its prototype) is written when installed, so a restarted "
        "or crashed server comes back with its users' histories and edits.",
    )
    g.add_argument(
        "--state",
        metavar="PATH",
        help="the state file (default: CACHE_DIR/device-state/device-PORT.sqlite for a fixed "
        "--port; none with --port 0, an ephemeral server that could not find its file again)",
    )
    g.add_argument(
        "--no-state",
        action="store_true",
        help="keep users in memory only (ephemeral runs: tests, replay); lost on restart",
    )
    g.add_argument(
        "--state-sync",
        choices=("normal", "full"),
        default="normal",
        help="normal: a committed event survives the process being killed (an OS crash may "
        "lose the last ones); full: fsync per event, survives power loss (default normal)",
    )
    _opt(
        g,
        "--max-users",
        100_000,
        "users held in memory; the least recently used beyond it are evicted (and reloaded "
        "from the state file on their next call; without one, forgotten)",
    )
    g.add_argument(
        "--max-memory-mb",
        type=float,
        help="cap on the users' estimated memory (histories, seen sets, cached states and "
        "scores, edits; not the model), MiB; the least recently used beyond it are evicted "
        "as beyond --max-users (default: no cap; GetStatus reports memory_bytes)",
    )
    g.add_argument(
        "--ann",
        dest="ann_mode",
        choices=("auto", "on", "off"),
        default="auto",
        help="faiss pre-selection of candidates before exact scoring: auto = from "
        "--ann-min-items items, on / off = forced (default auto)",
    )
    _opt(g, "--ann-min-items", 50_000, "catalogue size from which --ann auto pre-selects")
    _add_auth_options(
        p, "A device token acts for the user whose id is its subject (a user is a device)"
    )
    _add_server_options(p, default_port=50052)
    add_location_options(p)
    add_config_option(p)
    p.set_defaults(handler=cmd_serve_device)


def _register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="load benchmark of the gRPC services over loopback (Recommend, GenerateEdit)",
        description="Start the device server (and the cloud server) as child processes, "
        "drive them from this process over loopback with grpc.aio clients: Recommend in a "
        "closed loop (max throughput) and an open loop at --rate (latency at that load), "
        "both at --concurrency; then GenerateEdit with micro-batching on and off. Prints "
        "throughput and p50/p95/p99 latency; --json writes every figure.",
    )
    _add_dataset(p, "dataset")
    p.add_argument("--checkpoint", help="ranker checkpoint (default: as for serve device)")
    _opt(p, "--concurrency", 32, "calls in flight")
    _opt(p, "--duration", 10.0, "measured seconds per phase")
    _opt(p, "--warmup", 2.0, "seconds not counted per phase")
    _opt(p, "--rate", 1000.0, "open-loop Recommend rate, 1/s")
    _opt(p, "--k", 10, "k of Recommend")
    _opt(p, "--users", 500, "users the requests cycle over")
    p.add_argument(
        "--no-edits",
        action="store_true",
        help="rank with the base model (default: every user has an edit)",
    )
    p.add_argument(
        "--edit-engine",
        choices=("auto", "artifacts", "tiny"),
        default="auto",
        help="cloud engine for GenerateEdit (auto: artifacts if trained, else tiny)",
    )
    _opt(p, "--edit-duration", 8.0, "measured seconds per GenerateEdit phase")
    p.add_argument("--skip-edits", action="store_true", help="skip the GenerateEdit phases")
    p.add_argument(
        "--adaptor",
        help="adaptor artefact the cloud serves (default CACHE_DIR/artifacts/NAME/adaptor/"
        "adaptor.pt; e.g. one trained on a pretrained LLM's tokens)",
    )
    p.add_argument(
        "--edit-concurrency",
        type=int,
        help="GenerateEdit calls in flight (default: --concurrency)",
    )
    p.add_argument("--skip-recommend", action="store_true", help="skip the Recommend phases")
    _opt(p, "--torch-threads", 1, "torch threads in the servers")
    p.add_argument(
        "--auth",
        action="store_true",
        help="servers check a signed operator token on every call (a key made for the "
        "run), to measure what authentication costs",
    )
    add_location_options(p)
    add_json_option(p)
    p.set_defaults(handler=cmd_bench_serve)


def _register_state_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "device-state",
        help="what the device's durable state costs per RecordEvent (p50/p95, in process)",
        description="Run the device engine in this process (no cloud) and time RecordEvent "
        "without durable state, with --state-sync normal and with full, on a temporary "
        "state file, then with every user holding a pushed edit, with and without the harm "
        "guard's scoring and its stored evidence; prints p50/p95 per event, the added cost, "
        "the state write alone and the file size; then the time to open a state file of R "
        "guarded users (--open-users); --json writes them.",
    )
    _add_dataset(p, "dataset: locates the ranker")
    p.add_argument("--checkpoint", help="ranker checkpoint (default: as for serve device)")
    _opt(p, "--events", 2000, "RecordEvents timed per mode")
    _opt(p, "--users", 200, "users the events cycle over")
    p.add_argument(
        "--open-users", type=int, nargs="*", default=[10_000, 100_000], metavar="R",
        help="guarded users of the state files whose opening is timed; none given: skipped "
        "(default 10000 100000)",
    )  # fmt: skip
    _opt(p, "--open-repeats", 3, "opens timed per state file (the median is reported)")
    add_location_options(p)
    add_json_option(p)
    p.set_defaults(handler=cmd_bench_state)


def cmd_bench_state(args: argparse.Namespace) -> int:
    from device_ranker.service.state_bench import StateBenchConfig, run_state_bench

    cfg = StateBenchConfig(
        checkpoint=str(default_checkpoint(args)), events=args.events, users=args.users,
        dataset=args.dataset, open_users=tuple(args.open_users), open_repeats=args.open_repeats,
    )  # fmt: skip
    write_json(args.json, run_state_bench(cfg))
    return 0


def device_state_path(args: argparse.Namespace) -> str | None:
    """``--state``, else none with ``--no-state`` or ``--port 0``, else the per-port file
    in the cache folder."""
    if args.no_state:
        return None
    if args.state:
        return str(args.state)
    if args.port == 0:
        return None
    from recsys import settings

    return str(settings.cache_dir(args.cache_dir) / "device-state" / f"device-{args.port}.sqlite")


def _add_auth_options(p: argparse.ArgumentParser, rule: str) -> None:
    g = p.add_argument_group("authentication (recsys.serving.auth)")
    g.add_argument(
        "--auth-key",
        action="append",
        default=[],
        metavar="PATH",
        help="require callers' signed tokens (`recsys auth issue`) made with this key file "
        "(`recsys auth keygen`), or with a key in this directory of *.key files; repeat for "
        f"the old and the new key of a rotation (at most 2 keys). {rule}; an operator token "
        "acts for any. Key files are re-read when they change. Default: no authentication, "
        "every caller is trusted (for loopback only)",
    )
    _opt(g, "--auth-leeway", 30.0, "clock skew tolerated on token expiry, s")


def _auth(args: argparse.Namespace) -> Any:
    from recsys.serving.auth import AuthConfig

    return AuthConfig(keys=tuple(args.auth_key), leeway_s=args.auth_leeway)


def _add_server_options(p: argparse.ArgumentParser, default_port: int) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    g.add_argument(
        "--port",
        type=int,
        default=default_port,
        help=f"TCP port (default {default_port}; 0 = any free)",
    )
    g.add_argument("--port-file", help="write the bound port here once listening")
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=4 * 2**20,
        help="message size limit (default 4 MiB)",
    )
    _opt(g, "--grace", 5.0, "seconds in-flight calls get on SIGTERM")
    g.add_argument("--tls-cert", help="PEM certificate (with --tls-key: TLS on)")
    g.add_argument("--tls-key", help="PEM private key")
    g.add_argument("--max-concurrent-rpcs", type=int, help="calls served at once (default: no cap)")
    _opt(g, "--torch-threads", 1, "torch intra-op threads")
    g.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = any free port; "
        "default: off)",
    )
    g.add_argument(
        "--trace",
        choices=("off", "console", "otlp"),
        default="off",
        help="OpenTelemetry spans of each call, propagated to the cloud: console = printed "
        "as JSON, otlp = to OTEL_EXPORTER_OTLP_ENDPOINT (needs the OTLP exporter package) "
        "(default off)",
    )


def _tracing(args: argparse.Namespace, service: str) -> None:
    if args.trace != "off":
        from recsys.serving import tracing

        tracing.configure(args.trace, service_name=service)


def _server_options(args: argparse.Namespace) -> Any:
    from recsys.serving.server import ServerOptions

    return ServerOptions(
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        port_file=args.port_file,
        metrics_port=args.metrics_port,
    )


def _artifacts(args: argparse.Namespace) -> Path:
    from recsys import settings

    return settings.cache_dir(args.cache_dir) / "artifacts" / Path(args.dataset).name


def default_checkpoint(args: argparse.Namespace) -> Path:
    """``--checkpoint``, else the time-split ranker (what the adaptor's edits fit), else the
    leave-one-out ranker."""
    if getattr(args, "checkpoint", None):
        return Path(args.checkpoint)
    root = _artifacts(args)
    for name in ("ranker-time.pt", "ranker.pt"):
        if (root / name).is_file():
            return root / name
    from recsys.errors import NotFoundError

    raise NotFoundError(
        f"no ranker checkpoint in {root}; run `recsys train ranker --dataset {args.dataset}` "
        "or pass --checkpoint"
    )


def cmd_serve_cloud(args: argparse.Namespace) -> int:
    from codebook.refine import RefineConfig
    from codebook.store.writer import WriterConfig
    from llm_cloud.service.loading import ArtifactEngineConfig
    from llm_cloud.service.server import CloudConfig, serve_cloud
    from recsys.serving.fleet_guard import FleetGuardConfig

    artifacts = None
    if args.engine == "artifacts":
        artifacts = ArtifactEngineConfig(
            adaptor_path=args.adaptor or str(_artifacts(args) / "adaptor" / "adaptor.pt"),
            codebook_dir=args.codebook_dir,
            lm_dir=args.lm_dir,
            lm_backend=args.lm_backend,
            lm_options={"url": args.lm_url} if args.lm_url else {},
            store_url=args.store_url,
            prototypes=not args.no_prototypes,
            refine=RefineConfig(
                steps=args.refine_steps, lr=args.refine_lr, positions=args.refine_positions
            )
            if args.refine
            else None,
        )
    config = CloudConfig(
        engine=args.engine,
        artifacts=artifacts,
        dataset=args.dataset,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        head_spec=args.head_spec,
        store_url=args.store_url,
        seed=args.seed,
        batch=_batch(args.batch_max, args.batch_wait_ms),
        default_dtype=args.payload_dtype,
        write_behind=not args.no_write_behind,
        writer=WriterConfig(
            queue_size=args.writer_queue,
            full_wait_s=args.writer_full_wait_ms / 1000.0,
            max_batch=args.writer_batch,
            max_attempts=args.writer_attempts,
        ),
        auth=_auth(args),
        torch_threads=args.torch_threads,
        fleet_guard=FleetGuardConfig(
            mode=args.fleet_guard, z=args.fleet_guard_z, min_devices=args.fleet_guard_min_devices
        ),
        server=_server_options(args),
    )
    _tracing(args, "recsys-cloud")
    asyncio.run(serve_cloud(config))
    return 0


def cmd_serve_device(args: argparse.Namespace) -> int:
    from device_ranker.config import AnnConfig
    from device_ranker.gate import GateConfig
    from device_ranker.guard import GuardConfig
    from device_ranker.service.config import CloudLinkConfig, DeviceConfig
    from device_ranker.service.policy import StalenessConfig
    from device_ranker.service.server import serve_device

    experiment, arm_for = None, None
    if args.experiment:
        experiment, arm_for = experiment_arms(args.experiment, args.store_url)

    config = _from_args(
        DeviceConfig,
        args,
        checkpoint=str(default_checkpoint(args)),
        dataset=args.dataset if args.seed_histories != "none" else None,
        rank_batch=_batch(args.rank_batch, args.rank_wait_ms),
        experiment=experiment,
        trigger=args.gate_trigger,
        learned_gate=learned_gate_path(args) if args.gate_trigger == "learned" else None,
        guard_settings=GuardConfig(window=args.guard_window, z=args.guard_z),
        ann=AnnConfig(mode=args.ann_mode, min_items=args.ann_min_items),
        staleness=StalenessConfig(
            fit_clicks=args.fit_clicks,
            fit_every_click=args.fit_every_click,
            max_events=args.stale_events,
            max_seconds=args.stale_seconds,
            min_fit_mrr=args.stale_fit_mrr,
        ),
        gate=GateConfig(
            budget=args.gate_budget,
            window=args.gate_window,
            min_history=args.gate_min_history,
            min_gap=args.gate_min_gap,
            threshold=args.gate_threshold,
        ),
        cloud=CloudLinkConfig(
            target=args.cloud,
            deadline_s=args.cloud_deadline,
            probe_interval_s=args.probe_interval,
            token_file=args.cloud_token_file,
            tls_ca=args.cloud_tls_ca,
            tls_server_name=args.cloud_tls_name,
            payload_dtype=args.payload_dtype,
            recent_items=args.recent_items,
            summary_items=args.summary_items,
            send_summary=not args.no_summary,
            uplink_states=args.uplink_states,
            state_dtype=args.state_dtype,
        ),
        auth=_auth(args),
        state_path=device_state_path(args),
        server=_server_options(args),
    )
    if args.state and args.no_state:
        from recsys.errors import ValidationError

        raise ValidationError("--state and --no-state contradict each other; choose one")
    _tracing(args, "recsys-device")
    asyncio.run(serve_device(config, arm_for=arm_for))
    return 0


def learned_gate_path(args: argparse.Namespace) -> str:
    """``--learned-gate``, else the one ``*.learned_gate.npz`` beside the adaptor artefact
    (``recsys replay train-gate`` writes STEM.learned_gate.npz there)."""
    if args.learned_gate:
        return str(args.learned_gate)
    from recsys.errors import NotFoundError

    if not args.dataset:
        raise NotFoundError("--gate-trigger learned needs --learned-gate PATH (or --dataset)")
    found = sorted((_artifacts(args) / "adaptor").glob("*.learned_gate.npz"))
    if len(found) != 1:
        raise NotFoundError(
            f"{len(found)} learned gates (*.learned_gate.npz) beside the adaptor in "
            f"{_artifacts(args) / 'adaptor'}; pass --learned-gate PATH (train one with "
            f"`recsys replay train-gate --dataset {args.dataset}`)"
        )
    return str(found[0])


def experiment_arms(path: str, store_url: str | None) -> tuple[str, Any]:
    """(experiment name, arm resolver) for ``serve device --experiment``.

    The resolver hashes (salt, user) to an arm (``recsys.abtest.assignment.assign_arm``)
    and persists it with ``PrototypeStore.get_or_create_arm``, so a user keeps the arm
    first stored for it (also across restarts and replicas sharing the store).
    """
    from codebook.store import PrototypeStore
    from device_ranker.service.policy import ArmPolicy
    from recsys import settings
    from recsys.abtest.assignment import assign_arm
    from recsys.abtest.experiment import load_experiment
    from recsys.abtest.persist import stored_config

    exp = load_experiment(path)
    policies = {arm.name: dict(arm.policy) for arm in exp.arms}
    for policy in policies.values():  # fail at start-up, not at a user's first call
        ArmPolicy.from_dict(policy)
    weights = [(arm.name, float(arm.weight)) for arm in exp.arms]
    store = PrototypeStore.open(settings.database_url(store_url), upgrade=True)
    # the same stored config as `recsys abtest run`, so both can share one store
    record = store.create_experiment(exp.name, exp.salt, stored_config(exp), exist_ok=True)

    def arm_for(user_id: str) -> tuple[str, dict[str, Any]]:
        arm = store.get_or_create_arm(record.id, user_id, assign_arm(exp.salt, user_id, weights))
        if arm.arm not in policies:
            from recsys.errors import ValidationError

            raise ValidationError(
                f"user {user_id!r} is stored in arm {arm.arm!r}, which experiment {exp.name!r} "
                "no longer has; start a new experiment (a new name) to change the arms"
            )
        return arm.arm, policies[arm.arm]

    logger.info("experiment %r: arms %s, store %s", exp.name, weights, store.engine.url)
    return exp.name, arm_for


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from recsys.workflows.serve_bench import ServeBenchConfig, run_serve_bench

    cfg = _from_args(
        ServeBenchConfig,
        args,
        checkpoint=str(default_checkpoint(args)),
        adaptor=args.adaptor or str(_artifacts(args) / "adaptor" / "adaptor.pt"),
        with_edits=not args.no_edits,
    )
    write_json(args.json, run_serve_bench(cfg))
    return 0
