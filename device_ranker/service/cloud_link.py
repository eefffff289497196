"""The device's client of the cloud AdaptationService: deadlines, token, TLS, probing.

The token (``token_file``: this device's signed token from ``recsys auth issue``) is sent
with every call and re-read when the file changes (checked with each health probe), so a
reissued token (a key rotation, an expiry) needs no restart.

The device never blocks on the cloud: every call carries a deadline
(:attr:`CloudLinkConfig.deadline_s`), and a background task checks the cloud's standard
health service every ``probe_interval_s`` seconds, so :attr:`CloudLink.reachable` says
whether the cloud answers right now (a successful GenerateEdit also counts). The device
talks to the cloud **only** through the generated protos (``recsys.rpc.cloud.v1``).

**Several cloud replicas** (issue 17): the target may list several addresses
(``127.0.0.1:50051,127.0.0.1:50052``) or be a DNS name with several records
(:func:`recsys.serving.server.channel_target`). The one channel then spreads calls
``round_robin`` over the replicas whose standard health service reports the
AdaptationService SERVING (gRPC client-side health checking, a ``Watch`` stream per
replica): a replica that is killed or stops gracefully leaves the rotation as soon as its
connection drops or its health flips, without a restart of the device. A call in flight
on a replica that dies fails (UNAVAILABLE: the user keeps its last good edit, as with one
cloud); the next one goes to a survivor. Calls are not retried on another replica
(GenerateEdit is not idempotent: the cloud logs and folds every edit it answers).
:attr:`CloudLink.reachable` is true while any replica answers.

Example::

    link = CloudLink(CloudLinkConfig(target="127.0.0.1:50051", deadline_s=0.5))
    await link.start()
    response, up, down = await link.generate_edit(request)   # bytes up / down
    link.reachable, link.last_ok_ms
    await link.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from device_ranker.service.config import CloudLinkConfig
from recsys.errors import ValidationError
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.serving.auth import read_token, token_expiry, token_metadata
from recsys.serving.server import channel_target, client_channel

logger = logging.getLogger(__name__)

SERVICE_NAME = cpb.DESCRIPTOR.services_by_name["AdaptationService"].full_name


def warn_if_expiring(token: str | None, path: str | None, within_s: float = 86400.0) -> None:
    """Log when the link's token has expired or expires within ``within_s`` (its claims
    read without verifying: only the cloud holds the key)."""
    expires = token_expiry(token) if token else None
    if expires is None:
        return
    left = expires - time.time()
    if left <= 0:
        logger.error("the cloud token in %s expired %.0f s ago; reissue it", path, -left)
    elif left < within_s:
        logger.warning("the cloud token in %s expires in %.1f h; reissue it", path, left / 3600)


class CloudLink:
    """Asyncio client of the cloud service (one channel, reused).

    Args:
        config: :class:`CloudLinkConfig` (``target`` must be set).
    """

    def __init__(self, config: CloudLinkConfig) -> None:
        if not config.target:
            raise ValueError("CloudLink needs a target host:port")
        self.target = channel_target(config.target)  # checked now: a bad list fails early
        self.config = config
        self.token = read_token(config.token_file)
        self._metadata = token_metadata(self.token)
        warn_if_expiring(self.token, config.token_file)
        self._token_stat = self._stat_token()
        self.channel: grpc.aio.Channel | None = None
        self.stub: cpb_grpc.AdaptationServiceStub | None = None
        self.health: health_pb2_grpc.HealthStub | None = None
        self.reachable = False
        self.last_ok_ms = 0
        self.last_error = ""
        self._probe_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the channel and start probing (call from the serving event loop)."""
        cfg = self.config
        self.channel = client_channel(
            self.target,
            tls_ca=cfg.tls_ca,
            tls_server_name=cfg.tls_server_name,
            health_service=SERVICE_NAME,  # round_robin over the healthy replicas
        )
        self.stub = cpb_grpc.AdaptationServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        await self.probe()
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    def _mark(self, ok: bool, error: str = "") -> None:
        if ok:
            if not self.reachable:
                logger.info("cloud %s is reachable", self.config.target)
            self.reachable = True
            self.last_ok_ms = int(time.time() * 1000)
            self.last_error = ""
        else:
            if self.reachable or not self.last_error:
                logger.warning(
                    "cloud %s unreachable (%s): serving with the last good edit or the base model",
                    self.config.target,
                    error,
                )
            self.reachable = False
            self.last_error = error

    def _stat_token(self) -> tuple[int, int] | None:
        if not self.config.token_file:
            return None
        try:
            st = os.stat(self.config.token_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def refresh_token(self) -> bool:
        """Re-read the token file if it changed; True when a new token was loaded (a file
        that cannot be read keeps the current token, logged)."""
        stat = self._stat_token()
        if stat is None or stat == self._token_stat:
            return False
        self._token_stat = stat
        try:
            token = read_token(self.config.token_file)
        except ValidationError as exc:
            logger.error("keeping the current cloud token: %s", exc)
            return False
        if token == self.token:
            return False
        self.token, self._metadata = token, token_metadata(token)
        logger.info("cloud token reloaded from %s", self.config.token_file)
        warn_if_expiring(token, self.config.token_file)
        return True

    async def probe(self) -> bool:
        """One health check (deadline = the call deadline); updates :attr:`reachable`.
        Also picks up a changed token file."""
        assert self.health is not None
        self.refresh_token()
        try:
            reply = await self.health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=min(self.config.deadline_s, self.config.probe_interval_s),
            )
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            self._mark(ok, "" if ok else "cloud health is NOT_SERVING")
        except grpc.aio.AioRpcError as exc:
            self._mark(False, f"{exc.code().name}: {exc.details()}")
        return self.reachable

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the probe die; log and keep probing
                logger.exception("cloud probe failed")

    async def generate_edit(
        self, request: cpb.GenerateEditRequest
    ) -> tuple[cpb.GenerateEditResponse, int, int]:
        """GenerateEdit with the deadline and token; returns (response, bytes up, bytes down).

        Raises:
            grpc.aio.AioRpcError: any failure (DEADLINE_EXCEEDED, UNAVAILABLE, ...);
                reachability is updated before it propagates.
        """
        assert self.stub is not None
        up = request.ByteSize()
        try:
            response = await self.stub.GenerateEdit(
                request, timeout=self.config.deadline_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAUTHENTICATED,
            ):
                self._mark(False, f"{exc.code().name}: {exc.details()}")
            raise
        self._mark(True)
        return response, up, response.ByteSize()

    async def get_prototype(
        self, prototype_id: int, version: int, dtype: int
    ) -> tuple[cpb.Prototype, int]:
        """A prototype version (and the response's size in bytes)."""
        assert self.stub is not None
        reply = await self.stub.GetPrototype(
            cpb.GetPrototypeRequest(
                prototype_id=prototype_id, version=version, payload_dtype=dtype
            ),
            timeout=self.config.deadline_s,
            metadata=self._metadata,
        )
        return reply, reply.ByteSize()

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
