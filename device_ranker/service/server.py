"""The device server process: ``recsys serve device``.

Start-up order: the gRPC server binds first with health NOT_SERVING (calls answer
UNAVAILABLE), the ranker and the users' histories load in a worker thread (seeded from
the dataset; with a durable state, ``config.state_path``, the users it holds supersede
their seed and are reloaded from it on their next call), the cloud link starts probing,
then health flips to SERVING. SIGTERM/SIGINT: health NOT_SERVING, no new calls,
in-flight calls get ``grace_s`` to finish, then the engine closes (and the state file).
A SIGKILL loses no acknowledged event: each is committed before it is answered
(:mod:`device_ranker.service.state`).

Authentication (with ``config.auth`` keys): every RecommendationService call needs a
signed token (:mod:`recsys.serving.auth`; health and reflection stay open). Each user of
this server is one device: the user id is the device id the cloud sees (GenerateEdit's
``device_id``). So a ``device`` token acts for the user whose id is its subject, and only
for it (RecordEvent, ApplyEdit, RequestEdit, Recommend, GetStatus of that user;
PERMISSION_DENIED for another user, before anything changes); an ``operator`` token acts
for every user. A GetStatus without a user id needs any valid token.

Example::

    handle = await start_device(DeviceConfig(checkpoint="ranker.pt", dataset="ml-100k"))
    handle.port          # the bound (ephemeral) port
    await handle.stop()
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from device_ranker.service.config import DeviceConfig
from device_ranker.service.engine import DeviceEngine
from device_ranker.service.metrics import device_collector
from device_ranker.service.policy import ArmResolver
from device_ranker.service.servicer import SERVICE_NAME, RecommendationServicer
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.auth import AuthPolicy, auth_interceptors
from recsys.serving.errors import ErrorMappingInterceptor
from recsys.serving.service_host import ServiceHandle, start_service

logger = logging.getLogger(__name__)

# every method acts for request.user_id (a user = a device)
AUTH_POLICY = AuthPolicy(
    {
        f"/{SERVICE_NAME}/{name}": "user_id"
        for name in ("Recommend", "RecordEvent", "GetStatus", "ApplyEdit", "RequestEdit")
    }
)


@dataclass
class DeviceHandle(ServiceHandle):
    """A running device server (in this process)."""

    servicer: RecommendationServicer
    engine: DeviceEngine

    async def close(self) -> None:
        await self.engine.close()


async def start_device(config: DeviceConfig, arm_for: ArmResolver | None = None) -> DeviceHandle:
    """Bind, load the engine (health NOT_SERVING meanwhile), then serve.

    ``arm_for``: the experiment's arm resolver (user id -> (arm, policy dict)); None = no
    experiment (see :mod:`device_ranker.service.policy`).
    """
    servicer = RecommendationServicer()

    async def load() -> DeviceEngine:
        engine = await asyncio.to_thread(DeviceEngine.load, config, arm_for=arm_for)
        await engine.start()
        return engine

    def attach(engine: DeviceEngine) -> None:
        servicer.engine = engine

    server, engine = await start_service(
        config.server,
        [*auth_interceptors(config.auth, AUTH_POLICY), ErrorMappingInterceptor("device")],
        lambda s: pb_grpc.add_RecommendationServiceServicer_to_server(servicer, s),
        SERVICE_NAME,
        load=load,
        attach=attach,
    )
    if server.metrics is not None:  # --metrics-port: the engine's figures beside the RPCs'
        server.metrics.register(device_collector(engine))
    logger.info("device serving on port %d", server.port)
    return DeviceHandle(server, servicer, engine)


async def serve_device(
    config: DeviceConfig,
    stop_event: asyncio.Event | None = None,
    arm_for: ArmResolver | None = None,
) -> None:
    """Run the device server until SIGTERM/SIGINT (or ``stop_event``)."""
    await (await start_device(config, arm_for)).serve_until_signal(stop_event)
