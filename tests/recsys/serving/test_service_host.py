"""Hosting a service: NOT_SERVING while the engine loads, SERVING after, a failed load
stops the server, and stop closes the engine after the server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.serving.server import ServerOptions
from recsys.serving.service_host import ServiceHandle, start_service

NAME = "test.v1.Nothing"


async def health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=NAME), timeout=2)
        return reply.status


@dataclass
class Handle(ServiceHandle):
    events: list[str] = field(default_factory=list)

    async def close(self) -> None:
        self.events.append(f"close after the server stopped: {self.server._stopping}")


def test_serving_only_after_the_load_then_stop_closes(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    during: list[int] = []
    attached: list[str] = []

    async def load() -> str:  # the server is bound and has written its port by now
        during.append(await health(int(port_file.read_text())))
        return "engine"

    async def main() -> None:
        server, engine = await start_service(
            ServerOptions(port=0, port_file=str(port_file)),
            [],
            lambda s: None,
            NAME,
            load=load,
            attach=attached.append,
        )
        assert (engine, attached) == ("engine", ["engine"])
        assert during == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert await health(server.port) == health_pb2.HealthCheckResponse.SERVING
        handle = Handle(server)
        await handle.stop(0)
        assert handle.events == ["close after the server stopped: True"]

    asyncio.run(main())


def test_a_failed_load_stops_the_server(tmp_path: Path) -> None:
    port_file = tmp_path / "port"

    async def load() -> str:
        raise RuntimeError("no model")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="no model"):
            await start_service(
                ServerOptions(port=0, port_file=str(port_file)),
                [],
                lambda s: None,
                NAME,
                load=load,
                attach=print,
            )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health(int(port_file.read_text()))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())
