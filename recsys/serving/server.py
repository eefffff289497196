"""Server lifecycle shared by both services: options, health, reflection, TLS, shutdown.

:class:`GrpcServer` builds a ``grpc.aio`` server with the given servicers and
interceptors, adds the standard health service (every service NOT_SERVING until
:meth:`GrpcServer.set_serving` is called, i.e. until the models are loaded) and server
reflection, binds ``host:port`` (port 0 = an ephemeral port, reported by
:attr:`GrpcServer.port` and optionally written to a port file), with TLS when a
certificate and key are given, and message-size limits on both directions.

:func:`run_until_signal` serves until SIGTERM/SIGINT, then flips health to NOT_SERVING
and calls ``server.stop(grace)``: new calls are refused, calls in flight get ``grace``
seconds to finish.

Clients use :func:`client_channel` (same size limits, optional TLS, fast reconnect so a
restarted peer is found again within about a second). With ``health_service`` the channel
balances over every address of its target (:func:`channel_target`: several comma-separated
``ip:port``, or a DNS name with several records) with gRPC's ``round_robin`` policy and
client-side health checking (the standard health service's ``Watch``): a replica that is
down or NOT_SERVING gets no calls until it is healthy again.

Example::

    server = GrpcServer(ServerOptions(port=0), [ErrorMappingInterceptor("cloud")])
    server.add(lambda s: add_AdaptationServiceServicer_to_server(servicer, s), SERVICE_NAME)
    await server.start(); ...load models...; await server.set_serving(True)
    await run_until_signal(server)
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recsys.errors import ValidationError
from recsys.serving import tracing
from recsys.serving.metrics import ServerMetrics
from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20  # 4 MiB: an edit is ~7 KB, a top-1000 list ~30 KB


@config_dataclass
class ServerOptions:
    """Where and how a server listens.

    Attributes:
        host: interface to bind; loopback by default (nothing here is meant to face a
            network without TLS and the token).
        port: TCP port, 0 = ephemeral (see :attr:`GrpcServer.port`).
        max_message_bytes: limit on received and sent messages (both directions).
        grace_s: seconds in-flight calls get to finish on shutdown.
        tls_cert / tls_key: PEM files; both set = TLS, neither = plaintext.
        max_concurrent_rpcs: calls served at once before RESOURCE_EXHAUSTED (None = no cap).
        port_file: write the bound port there (atomically) once the server is started.
        metrics_port: serve Prometheus metrics at ``http://host:PORT/metrics``
            (``https://`` with the TLS pair above; :mod:`recsys.serving.metrics`;
            0 = ephemeral, None = off).
    """

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(0, ge=0, le=65535)
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    grace_s: float = Field(5.0, ge=0.0)
    tls_cert: str | None = None
    tls_key: str | None = None
    max_concurrent_rpcs: int | None = Field(None, ge=1)
    port_file: str | None = None
    metrics_port: int | None = Field(None, ge=0, le=65535)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert, --tls-key)")


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Channel arguments limiting message sizes in both directions."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read the {what} {path}: {exc.strerror}") from None


_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"bad address {address!r}: expected host:port (e.g. 127.0.0.1:50051)")
    return host.strip("[]"), int(port)


def channel_target(target: str) -> str:
    """A user-facing address list -> a gRPC target URI.

    * ``host:port`` (one address, a name or an IP) and anything with a scheme
      (``dns:///cloud.internal:50051``, ``ipv4:10.0.0.1:1,10.0.0.2:1``) pass unchanged;
      gRPC's default resolver is DNS, so a name with several records is several backends.
    * several comma-separated addresses (``127.0.0.1:50051,127.0.0.1:50052``) become the
      static ``ipv4:`` (or ``ipv6:``) target; they must be IP literals (``localhost`` is
      read as 127.0.0.1), since gRPC has no static list of names: give several replicas
      one DNS name instead.

    Raises:
        ValidationError: an empty entry, a bad port, a name in a list, mixed families.
    """
    target = target.strip()
    if not target:
        raise ValidationError("the target is empty; expected host:port or a list of them")
    if target.startswith(_SCHEMES) or "," not in target:
        return target
    hosts: list[str] = []
    families = set()
    for part in target.split(","):
        host, port = _split_host_port(part.strip())
        host = "127.0.0.1" if host == "localhost" else host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValidationError(
                f"{host!r} in the address list {target!r} is not an IP address: list IP "
                "literals (ip:port,ip:port), or give the replicas one DNS name "
                "(dns:///name:port) that resolves to all of them"
            ) from None
        families.add(ip.version)
        hosts.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    if len(families) > 1:
        raise ValidationError(f"the address list {target!r} mixes IPv4 and IPv6 addresses")
    return f"ipv{families.pop()}:{','.join(hosts)}"


def balanced_service_config(health_service: str) -> str:
    """The channel's service config (JSON): ``round_robin`` over every resolved address,
    each health-checked with the standard health service's ``Watch`` on
    ``health_service`` ("" = the server as a whole); an unhealthy address gets no calls."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": health_service},
        }
    )


def client_channel(
    target: str,
    *,
    tls_ca: str | Path | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls_server_name: str | None = None,
    health_service: str | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` (``host:port``, a list of ``ip:port`` or a gRPC
    target URI: :func:`channel_target`).

    With ``tls_ca`` (PEM of the CA or the self-signed server certificate) the channel
    uses TLS and checks the server's name (``tls_server_name`` overrides it; set it when
    the target is a list of addresses). Reconnect backoff is capped at 2 s, so a
    restarted server is found again quickly. With ``health_service`` (a full service
    name, or "" for the whole server) calls are spread ``round_robin`` over the healthy
    addresses (:func:`balanced_service_config`); without it gRPC's default
    ``pick_first`` uses one address at a time.
    """
    target = channel_target(target)
    options = [
        *message_options(max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),  # the caller decides; a retry would blow the deadline
    ]
    if health_service is not None:
        options.append(("grpc.service_config", balanced_service_config(health_service)))
    if tls_ca:
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "CA certificate"))
        return grpc.aio.secure_channel(
            target, creds, options=options, interceptors=tracing.client_interceptors()
        )
    return grpc.aio.insecure_channel(
        target, options=options, interceptors=tracing.client_interceptors()
    )


class GrpcServer:
    """A ``grpc.aio`` server with health checking, reflection and graceful shutdown.

    Args:
        options: :class:`ServerOptions`.
        interceptors: server interceptors, outermost first (e.g. token check, then the
            error mapping).
    """

    def __init__(
        self, options: ServerOptions, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    ) -> None:
        self.options = options
        self.interceptors = list(interceptors)
        self._registrations: list[Callable[[grpc.aio.Server], None]] = []
        self.server: grpc.aio.Server | None = None  # built in start(), on the serving loop
        self.health = health.aio.HealthServicer()
        self.service_names: list[str] = []
        self.port: int | None = None
        # with options.metrics_port: per-RPC metrics (outermost) and a /metrics endpoint
        self.metrics = ServerMetrics() if options.metrics_port is not None else None
        self._stopping = False

    def add(self, register: Callable[[grpc.aio.Server], None], service_name: str) -> None:
        """Register a servicer (``register(server)`` calls the generated ``add_..._to_server``)
        under its full service name (for health and reflection)."""
        self._registrations.append(register)
        self.service_names.append(service_name)

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING), write the port file; returns the port."""
        observe = [self.metrics.interceptor] if self.metrics is not None else []
        self.server = grpc.aio.server(
            interceptors=[*observe, *tracing.server_interceptors(), *self.interceptors],
            options=[*message_options(self.options.max_message_bytes), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self.options.max_concurrent_rpcs,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for register in self._registrations:
            register(self.server)
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        opts = self.options
        address = f"{opts.host}:{opts.port}"
        try:
            if opts.tls_cert:
                creds = grpc.ssl_server_credentials(
                    [(_read(opts.tls_key, "TLS key"), _read(opts.tls_cert, "TLS certificate"))]
                )
                port = self.server.add_secure_port(address, creds)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ValidationError(f"cannot listen on {address}: {exc}") from None
        if not port:
            raise ValidationError(f"cannot listen on {address} (port in use?)")
        if self.metrics is not None and opts.metrics_port is not None:
            self.metrics.serve(opts.metrics_port, opts.host, opts.tls_cert, opts.tls_key)
        await self.server.start()
        self.port = int(port)
        if opts.port_file:
            path = Path(opts.port_file)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(f"{self.port}\n")
            tmp.replace(path)
        logger.info(
            "listening on %s:%d (%s), services %s",
            opts.host,
            self.port,
            "TLS" if opts.tls_cert else "plaintext",
            ", ".join(self.service_names),
        )
        return self.port

    async def set_serving(self, serving: bool = True) -> None:
        """Health SERVING (models loaded) or NOT_SERVING, for the server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new calls, let in-flight calls finish
        within ``grace`` seconds (default ``options.grace_s``). Idempotent."""
        if self._stopping or self.server is None:
            return
        self._stopping = True
        grace = self.options.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        logger.info("shutting down (grace %.1f s)", grace)
        await self.server.stop(grace)
        if self.metrics is not None:
            self.metrics.close()
        logger.info("stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


async def run_until_signal(
    server: GrpcServer,
    *,
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    stop_event: asyncio.Event | None = None,
) -> None:
    """Serve until one of ``signals`` arrives (or ``stop_event`` is set), then stop
    gracefully (:meth:`GrpcServer.stop`)."""
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    installed = []
    for sig in signals:
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            continue
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop()
