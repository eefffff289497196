"""The cloud server process: ``recsys serve cloud``.

Start-up order: the gRPC server binds first with health NOT_SERVING (calls answer
UNAVAILABLE), the engine loads in a worker thread (adaptor, semantic IDs, LM backend,
prototype bank, store), then health flips to SERVING. With a store, the engine gets a
write-behind writer (:class:`codebook.store.writer.StoreWriter`, its own connection):
GenerateEdit answers from memory and its assignments, refinements and edit-log rows are
written by the writer thread in batched, retried transactions. With auth keys, the
authentication interceptor (:mod:`recsys.serving.auth`: a signed device token, whose
subject must be the GenerateEdit request's ``device_id`` unless it is an operator's) runs
before the error-mapping interceptor. SIGTERM/SIGINT:
health NOT_SERVING, no new calls, in-flight calls get ``grace_s`` to finish (the
micro-batcher finishes its queue), then the writer writes everything queued, then the
engine closes.

With ``server.metrics_port``, Prometheus metrics (per-RPC counts and latencies, the
micro-batches, the store writer, the process: :mod:`llm_cloud.service.metrics`) are
served at ``http://host:PORT/metrics``; with tracing configured
(:mod:`recsys.serving.tracing`), each GenerateEdit continues the caller's trace.

Example::

    handle = await start_cloud(CloudConfig(engine="tiny", dataset="path/to/ds",
                                           head_spec="fc0=16x8,fc1=8x16"))
    handle.port
    await handle.stop()
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from codebook.store.writer import StoreWriter, WriterConfig
from llm_cloud.service.engine import AdaptationEngine
from llm_cloud.service.loading import ArtifactEngineConfig, engine_from_artifacts
from llm_cloud.service.metrics import cloud_collector
from llm_cloud.service.servicer import SERVICE_NAME, AdaptationServicer
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.serving.auth import AuthConfig, AuthPolicy, auth_interceptors
from recsys.serving.batching import BatchConfig
from recsys.serving.errors import ErrorMappingInterceptor
from recsys.serving.fleet_guard import FleetGuardConfig
from recsys.serving.server import ServerOptions
from recsys.serving.service_host import ServiceHandle, start_service
from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)

# GenerateEdit acts for request.device_id: it writes that device's prototype assignment,
# feeds the refinement of its prototype and its edit-log rows. The prototype reads need a
# valid token of any device.
AUTH_POLICY = AuthPolicy({f"/{SERVICE_NAME}/GenerateEdit": "device_id"})


@config_dataclass
class CloudConfig:
    """The cloud service.

    Attributes:
        engine: "artifacts" (the trained adaptor + LM + prototypes) or "tiny" (untrained
            toy engine for tests and smoke runs).
        artifacts: where the trained pieces are (engine "artifacts").
        dataset / data_dir / cache_dir: the catalogue of the tiny engine.
        head_spec: the tiny engine's head, "fc0=OUTxIN,fc1=OUTxIN".
        store_url: the tiny engine's prototype store (None = no prototypes, no log).
        batch: micro-batching of GenerateEdit (max_batch 1 = off).
        default_dtype: payload precision for requests that leave it unspecified.
        write_behind: with a store, queue the store writes to a writer thread (False:
            write them in the batch, as offline tools do).
        writer: the writer's queue size, full-queue wait, batch size and retries.
        auth: the keys whose signed tokens callers must present (none = no check); a
            device token may ask edits for its own device id only (:data:`AUTH_POLICY`).
        torch_threads: intra-op threads of torch in the server.
        fleet_guard: the fleet guard over the devices' reported harm-guard evidence
            (:class:`recsys.serving.fleet_guard.FleetGuardConfig`; mode "off" by default:
            no decision is sent and devices apply their edits).
        server: :class:`ServerOptions`.
    """

    engine: Literal["artifacts", "tiny"] = "artifacts"
    artifacts: ArtifactEngineConfig | None = None
    dataset: str | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    head_spec: str = "fc0=128x64,fc1=64x128"
    store_url: str | None = None
    seed: int = 0
    batch: BatchConfig = field(default_factory=BatchConfig)
    default_dtype: Literal["fp16", "int8"] = "fp16"
    write_behind: bool = True
    writer: WriterConfig = field(default_factory=WriterConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    torch_threads: int = Field(1, ge=1)
    fleet_guard: FleetGuardConfig = field(default_factory=FleetGuardConfig)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        if self.engine == "artifacts" and self.artifacts is None:
            raise ValueError("engine 'artifacts' needs the adaptor artefact (--adaptor)")
        if self.engine == "tiny" and not self.dataset:
            raise ValueError("engine 'tiny' needs a dataset for its catalogue (--dataset)")


def load_engine(config: CloudConfig) -> AdaptationEngine:
    """Build the configured engine (blocking; the server runs it in a worker thread)."""
    torch.set_num_threads(config.torch_threads)
    if config.engine == "tiny":
        from llm_cloud.service.tiny import build_tiny_engine, parse_head_spec
        from recsys.data.registry import load_dataset

        ds = load_dataset(config.dataset, data_dir=config.data_dir, cache_dir=config.cache_dir)
        return build_tiny_engine(
            [str(i) for i in ds.item_ids],
            parse_head_spec(config.head_spec),
            store_url=config.store_url,
            seed=config.seed,
        )
    assert config.artifacts is not None
    return engine_from_artifacts(config.artifacts)


def seed_edit_ids(engine: AdaptationEngine) -> None:
    """Make edit ids keep increasing across restarts.

    With a store, edit ids are the edit log's row ids (the store's sequence: they continue
    from its largest id after a restart; rows are never deleted). Without one, the engine
    counts in memory: its counter starts at the current time in microseconds, so a
    restarted cloud hands out larger ids than before (as long as it served fewer than
    10^6 edits per second of uptime and the clock did not step back).
    """
    if getattr(engine, "store", None) is None and hasattr(engine, "_edit_counter"):
        engine._edit_counter = max(engine._edit_counter, time.time_ns() // 1000)


@dataclass
class CloudHandle(ServiceHandle):
    """A running cloud server (in this process)."""

    servicer: AdaptationServicer
    engine: AdaptationEngine
    writer: StoreWriter | None = None

    async def close(self) -> None:
        """The batcher, then the writer (flushes its queue), then the engine."""
        await self.servicer.close()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        await asyncio.to_thread(self.engine.close)


def attach_writer(engine: AdaptationEngine, config: WriterConfig) -> StoreWriter | None:
    """Give an engine with a store a write-behind writer on its own connection (None:
    the engine has no store or cannot take one)."""
    store = getattr(engine, "store", None)
    if store is None or not hasattr(engine, "attach_writer"):
        return None
    writer = StoreWriter.open(store.engine.url, config)
    engine.attach_writer(writer)
    return writer


async def start_cloud(config: CloudConfig, engine: AdaptationEngine | None = None) -> CloudHandle:
    """Bind, load the engine (health NOT_SERVING meanwhile), then serve.

    ``engine``: an already built engine (tests); default: :func:`load_engine`.
    """
    interceptors = auth_interceptors(config.auth, AUTH_POLICY)
    interceptors.append(ErrorMappingInterceptor("cloud"))
    servicer = AdaptationServicer(config.batch, config.default_dtype, config.fleet_guard)
    writers: list[StoreWriter] = []

    async def load() -> AdaptationEngine:
        loaded = engine if engine is not None else await asyncio.to_thread(load_engine, config)
        seed_edit_ids(loaded)
        if config.write_behind:
            writer = await asyncio.to_thread(attach_writer, loaded, config.writer)
            if writer is not None:
                writers.append(writer)
        return loaded

    server, loaded = await start_service(
        config.server,
        interceptors,
        lambda s: cpb_grpc.add_AdaptationServiceServicer_to_server(servicer, s),
        SERVICE_NAME,
        load=load,
        attach=servicer.set_engine,
    )
    if server.metrics is not None:  # --metrics-port: the engine's figures beside the RPCs'
        server.metrics.register(cloud_collector(servicer, loaded))
    logger.info("cloud serving on port %d: %s", server.port, loaded.info())
    return CloudHandle(server, servicer, loaded, writers[0] if writers else None)


async def serve_cloud(config: CloudConfig, stop_event: asyncio.Event | None = None) -> None:
    """Run the cloud server until SIGTERM/SIGINT (or ``stop_event``)."""
    await (await start_cloud(config)).serve_until_signal(stop_event)
