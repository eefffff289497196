"""Typed errors of the client: one class per gRPC status a caller handles differently.

Every failed call raises a :class:`ClientError` subclass naming the method, the target,
the status and the server's message; nothing returns a half-filled result. A request the
client cannot even build (a wrong type, e.g. ``k="ten"``) raises
:class:`InvalidArgumentError` before anything is sent.

Each class also derives from the project's domain error a caller may already catch
(:class:`recsys.errors.ValidationError` for INVALID_ARGUMENT,
:class:`recsys.errors.NotFoundError` for NOT_FOUND, :class:`TimeoutError` for
DEADLINE_EXCEEDED, :class:`ConnectionError` for UNAVAILABLE).

Example::

    try:
        client.recommend("u1", k=0)
    except InvalidArgumentError as exc:
        print(exc.code.name, exc.details)   # INVALID_ARGUMENT k must be in 1..1000 ...
"""

from __future__ import annotations

import grpc

from recsys import errors


class ClientError(errors.RecsysError):
    """A call failed: ``code`` (:class:`grpc.StatusCode`), ``details`` (the server's
    message), ``method`` and ``target``; ``attempts`` = calls made (> 1 after retries)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, method: str, target: str, details: str, *, code: grpc.StatusCode | None = None,
        attempts: int = 1,
    ) -> None:  # fmt: skip
        self.method, self.target, self.details, self.attempts = method, target, details, attempts
        if code is not None:
            self.code = code
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{method} to {target} failed{tries}: {self.code.name}: {details}")

    def __str__(self) -> str:  # KeyError (NotFoundError's base) would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(ClientError, errors.ValidationError):
    """INVALID_ARGUMENT: the request is malformed (out of range, empty, unknown probe)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ClientError, errors.NotFoundError):
    """NOT_FOUND: an unknown user, item or prototype."""

    code = grpc.StatusCode.NOT_FOUND


class UnauthenticatedError(ClientError):
    """UNAUTHENTICATED: no token, or a malformed, expired or forged one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ClientError):
    """PERMISSION_DENIED: a device token acting for another id (nothing changed)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(ClientError, ConnectionError):
    """UNAVAILABLE after every retry: the server is down, unreachable or still loading."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ClientError, TimeoutError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline (not retried: the server
    may have acted on the request)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhaustedError(ClientError):
    """RESOURCE_EXHAUSTED: the server's concurrency cap or a message-size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ServerError(ClientError):
    """Any other status (INTERNAL, UNKNOWN, ...): a bug on the server side (logged there)."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    c.code: c
    for c in (
        InvalidArgumentError, NotFoundError, UnauthenticatedError, PermissionDeniedError,
        UnavailableError, DeadlineExceededError, ResourceExhaustedError,
    )
}  # fmt: skip


def from_rpc_error(exc: grpc.RpcError, method: str, target: str, attempts: int = 1) -> ClientError:
    """The typed error of a failed call (``exc``: a ``grpc.RpcError`` or ``AioRpcError``)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or str(exc)
    cls = _BY_CODE.get(code, ServerError)
    return cls(method, target, details, code=code, attempts=attempts)


__all__ = [
    "ClientError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServerError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
]
