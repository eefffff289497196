"""Channels, tokens, deadlines and retries: what every client call goes through.

:class:`ClientOptions` says how to reach a service: a deadline per attempt
(``timeout_s``), the retry policy (:class:`RetryPolicy`: UNAVAILABLE only, jittered
exponential back-off, bounded attempts and an optional total budget), the caller's token
(a string, or a file re-read when it changes so a reissued token is picked up without a
restart) and TLS (the CA or self-signed server certificate, and the name to check).

:class:`SyncTransport` (``grpc`` channel) and :class:`AsyncTransport` (``grpc.aio``) make
one call with those rules and turn a failure into a typed
:class:`~recsys.client.errors.ClientError`. Only UNAVAILABLE is retried (the server was
not reached, or is still loading its model, so it has not acted on the request);
DEADLINE_EXCEEDED is not (the server may have acted). The channels never retry on their
own (``grpc.enable_retries`` 0) and reconnect quickly (back-off capped at 2 s): the
asyncio channel is :func:`recsys.serving.server.client_channel`'s, the blocking one has
the same arguments. A target is ``host:port``, a list of ``ip:port`` or a gRPC target URI
(:func:`recsys.serving.server.channel_target`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from pydantic import Field
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from recsys.client.errors import ClientError, InvalidArgumentError, from_rpc_error
from recsys.errors import ValidationError
from recsys.serving.auth import read_token, token_expiry, token_metadata
from recsys.serving.server import (
    DEFAULT_MAX_MESSAGE_BYTES,
    channel_target,
    client_channel,
    message_options,
)
from recsys.validation import config_dataclass

logger = logging.getLogger(__name__)

RENEW_WARNING_S = 86400.0  # warn (once per token) when it expires within a day


@config_dataclass
class RetryPolicy:
    """Retries of a call answered UNAVAILABLE.

    Attributes:
        attempts: calls at most (1 = no retry).
        initial_backoff_s / max_backoff_s: the first wait and the cap; the wait doubles
            after each attempt, plus up to ``jitter_s`` of random jitter.
        budget_s: stop retrying once this many seconds have passed since the first
            attempt (None: only ``attempts`` bounds it).
    """

    attempts: int = Field(6, ge=1, le=1000)
    initial_backoff_s: float = Field(0.1, gt=0, le=60)
    max_backoff_s: float = Field(2.0, gt=0, le=600)
    jitter_s: float = Field(0.1, ge=0, le=60)
    budget_s: float | None = Field(None, gt=0)


@config_dataclass
class ClientOptions:
    """How a client reaches a service.

    Attributes:
        timeout_s: the deadline of each attempt, seconds (a method's ``timeout_s``
            argument overrides it for one call).
        retry: see :class:`RetryPolicy`.
        token / token_file: the caller's signed token (``recsys auth issue``), sent as
            ``authorization: Bearer <token>``; the file is re-read when it changes. At most
            one of the two; neither = no token.
        tls_ca: PEM of the CA (or the self-signed server certificate): TLS on; None =
            plaintext (loopback only).
        tls_server_name: the name to check in the server certificate (default: the
            target's host).
        max_message_bytes: message size limit, both directions.
    """

    timeout_s: float = Field(10.0, gt=0)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    token: str | None = None
    token_file: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024)

    def __post_init__(self) -> None:
        if self.token and self.token_file:
            raise ValueError("give token or token_file, not both")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("token must be one non-empty string without spaces")


class Credentials:
    """The token a call carries: a fixed string, or a file re-read when its mtime or
    size changes (a reissued token is used from the next call on)."""

    def __init__(self, token: str | None = None, token_file: str | Path | None = None) -> None:
        self._token, self._file = token, Path(token_file) if token_file else None
        self._stamp: tuple[int, int] | None = None
        self._warned: str | None = None
        if self._file is not None:
            self._reload()
        self._check_expiry()

    def _reload(self) -> None:
        assert self._file is not None
        try:
            st = os.stat(self._file)
        except OSError as exc:
            raise ValidationError(
                f"cannot read the token file {self._file}: {exc.strerror}"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._token, self._stamp = read_token(self._file), stamp
            self._check_expiry()

    def _check_expiry(self) -> None:
        exp = token_expiry(self._token) if self._token else None
        if exp is not None and self._warned != self._token and exp - time.time() < RENEW_WARNING_S:
            self._warned = self._token
            left = exp - time.time()
            state = f"expired {-left:.0f} s ago" if left < 0 else f"expires in {left:.0f} s"
            logger.warning("the client's token %s: renew it (recsys auth issue)", state)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata (empty without a token)."""
        if self._file is not None:
            self._reload()
        return token_metadata(self._token)


def channel_options(options: ClientOptions) -> list[tuple[str, Any]]:
    """The blocking channel's arguments: size limits, fast reconnect, no built-in retries
    (as :func:`recsys.serving.server.client_channel`, which the asyncio clients use)."""
    out = [
        *message_options(options.max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),  # RetryPolicy decides, under the caller's deadline
    ]
    if options.tls_ca and options.tls_server_name:
        out.append(("grpc.ssl_target_name_override", options.tls_server_name))
    return out


def _credentials(options: ClientOptions) -> grpc.ChannelCredentials | None:
    if not options.tls_ca:
        return None
    try:
        pem = Path(options.tls_ca).read_bytes()
    except OSError as exc:
        raise ValidationError(
            f"cannot read the CA certificate {options.tls_ca}: {exc.strerror}"
        ) from None
    return grpc.ssl_channel_credentials(root_certificates=pem)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    details = exc.details() if isinstance(exc, grpc.RpcError) else exc
    logger.info("attempt %d answered UNAVAILABLE (%s); retrying in %.2f s",
                state.attempt_number, details, wait)  # fmt: skip


def retry_arguments(policy: RetryPolicy) -> dict[str, Any]:
    """tenacity arguments of ``policy`` (the last error is re-raised as it came)."""
    stop = stop_after_attempt(policy.attempts)
    if policy.budget_s is not None:
        stop = stop | stop_after_delay(policy.budget_s)
    return {
        "retry": retry_if_exception(_retryable),
        "stop": stop,
        "wait": wait_exponential(multiplier=policy.initial_backoff_s, max=policy.max_backoff_s)
        + wait_random(0, policy.jitter_s),
        "before_sleep": _log_retry,
        "reraise": True,
    }


def build_request(factory: Callable[..., Any], method: str, target: str, **fields: Any) -> Any:
    """``factory(**fields)`` (a protobuf message); a field of the wrong type or range is
    :class:`InvalidArgumentError`, raised before anything is sent."""
    try:
        return factory(**fields)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(method, target, f"bad request field: {exc}") from None


class _Transport:
    def __init__(self, target: str, options: ClientOptions | None) -> None:
        self.target = target
        self.options = options or ClientOptions()
        self.credentials = Credentials(self.options.token, self.options.token_file)

    def _timeout(self, timeout_s: float | None) -> float:
        return self.options.timeout_s if timeout_s is None else timeout_s


class SyncTransport(_Transport):
    """Blocking calls over a ``grpc`` channel; ``stub_class`` is the generated stub."""

    def __init__(self, target: str, stub_class: type, options: ClientOptions | None = None) -> None:
        super().__init__(target, options)
        creds, opts = _credentials(self.options), channel_options(self.options)
        self.channel = (
            grpc.secure_channel(channel_target(target), creds, options=opts)
            if creds
            else grpc.insecure_channel(channel_target(target), options=opts)
        )
        self.stub = stub_class(self.channel)

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """``method`` (the stub's attribute, e.g. ``"Recommend"``) with retries."""
        rpc, timeout = getattr(self.stub, method), self._timeout(timeout_s)
        retrying = Retrying(**retry_arguments(self.options.retry))
        try:
            return retrying(
                lambda: rpc(request, timeout=timeout, metadata=self.credentials.metadata())
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(
                exc, method, self.target, retrying.statistics.get("attempt_number", 1)
            ) from None

    def close(self) -> None:
        self.channel.close()


class AsyncTransport(_Transport):
    """Awaitable calls over a ``grpc.aio`` channel (create it inside the running loop)."""

    def __init__(self, target: str, stub_class: type, options: ClientOptions | None = None) -> None:
        super().__init__(target, options)
        o = self.options
        self.channel: grpc.aio.Channel | None = client_channel(
            target, tls_ca=o.tls_ca, tls_server_name=o.tls_server_name,
            max_message_bytes=o.max_message_bytes,
        )  # fmt: skip
        self.stub = stub_class(self.channel)

    async def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """``method`` (the stub's attribute, e.g. ``"Recommend"``) with retries."""
        rpc, timeout = getattr(self.stub, method), self._timeout(timeout_s)
        retrying = AsyncRetrying(**retry_arguments(self.options.retry))
        try:
            async for attempt in retrying:
                with attempt:
                    return await rpc(request, timeout=timeout, metadata=self.credentials.metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(
                exc, method, self.target, retrying.statistics.get("attempt_number", 1)
            ) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


__all__ = [
    "AsyncTransport",
    "ClientError",
    "ClientOptions",
    "Credentials",
    "RetryPolicy",
    "SyncTransport",
    "build_request",
    "channel_options",
    "retry_arguments",
]
