"""Hosting one service in this process: the start-up and shutdown both servers share.

Start-up order (:func:`start_service`): the gRPC server binds first with health
NOT_SERVING (calls answer UNAVAILABLE), the engine loads (``load``, typically in a worker
thread), the servicer gets it (``attach``), the loaded heap is frozen out of the garbage
collector's passes, then health flips to SERVING. A failed load stops the server again.
Shutdown (:meth:`ServiceHandle.stop`): a graceful server stop (in-flight calls finish
within the grace), then the service's own :meth:`ServiceHandle.close`.
:meth:`ServiceHandle.serve_until_signal` runs until SIGTERM/SIGINT (or an event).

The device (:mod:`device_ranker.service.server`) and the cloud
(:mod:`llm_cloud.service.server`) subclass :class:`ServiceHandle` with their servicer,
engine and close; this module knows neither.

Example::

    server, engine = await start_service(
        options, [ErrorMappingInterceptor("cloud")],
        lambda s: add_AdaptationServiceServicer_to_server(servicer, s), SERVICE_NAME,
        load=lambda: asyncio.to_thread(load_engine, config), attach=servicer.set_engine)
    handle = CloudHandle(server, servicer, engine)
    await handle.serve_until_signal()
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc.aio

from recsys.serving.server import GrpcServer, ServerOptions, run_until_signal

logger = logging.getLogger(__name__)

E = TypeVar("E")


async def start_service(
    options: ServerOptions,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    register: Callable[[grpc.aio.Server], None],
    service_name: str,
    *,
    load: Callable[[], Awaitable[E]],
    attach: Callable[[E], None],
) -> tuple[GrpcServer, E]:
    """Bind and serve (health NOT_SERVING), ``load()`` the engine, ``attach(engine)`` it
    to the servicer, then health SERVING; returns (the server, the engine).

    Args:
        options / interceptors: the server's (:class:`GrpcServer`).
        register / service_name: the servicer's generated ``add_..._to_server`` call and
            its full service name (health, reflection).
        load: builds the engine (awaited while the server answers UNAVAILABLE).
        attach: hands the engine to the servicer.
    """
    server = GrpcServer(options, interceptors)
    server.add(register, service_name)
    await server.start()
    try:
        engine = await load()
    except BaseException:
        await server.stop(0)
        raise
    attach(engine)
    gc.collect()
    gc.freeze()  # loaded models and data never become garbage: keep them out of GC passes
    await server.set_serving(True)
    return server, engine


@dataclass
class ServiceHandle:
    """A running service in this process (subclasses add the servicer and the engine)."""

    server: GrpcServer

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    async def close(self) -> None:
        """Release the service's engine after the server stopped (subclasses)."""

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop (in-flight calls finish within ``grace``), then :meth:`close`."""
        await self.server.stop(grace)
        await self.close()

    async def serve_until_signal(self, stop_event: asyncio.Event | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or ``stop_event``), then :meth:`stop`."""
        try:
            await run_until_signal(self.server, stop_event=stop_event)
        finally:
            await self.stop()


__all__ = ["ServiceHandle", "start_service"]
