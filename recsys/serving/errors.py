"""The one place that maps domain errors to gRPC status codes, as a server interceptor.

Servicers raise the project's domain errors (:mod:`recsys.errors`) and never set status
codes for them; :class:`ErrorMappingInterceptor`, installed once per server, turns them
into status codes with the error's message:

==============================  ======================  =================================
raised in a handler             status code             details sent to the client
==============================  ======================  =================================
``ValidationError``             ``INVALID_ARGUMENT``    the error's message
``NotFoundError``               ``NOT_FOUND``           the error's message
``NotReadyError``               ``UNAVAILABLE``         the error's message
``OverloadedError``             ``RESOURCE_EXHAUSTED``  the error's message
``RecsysError`` with            ``UNAVAILABLE``         the error's message
``retryable = True`` (the
store's ``StoreBusyError``)
other ``RecsysError``           ``FAILED_PRECONDITION`` the error's message
``asyncio.TimeoutError``        ``DEADLINE_EXCEEDED``   "deadline exceeded"
anything else                   ``INTERNAL``            generic text + an error id; the
                                                        traceback is logged with that id
request bytes that do not       ``INVALID_ARGUMENT``    "malformed request: ..."
decode as the method's message
==============================  ======================  =================================

UNAUTHENTICATED and PERMISSION_DENIED are answered before the handler runs, by the
authentication interceptor (:mod:`recsys.serving.auth`), which runs first.

Aborts raised by ``context.abort`` and cancellations pass through untouched. Only unary
-> unary methods are wrapped (every project RPC is one); streaming handlers such as the
health service's ``Watch`` are passed on unchanged. A mapped error is logged at INFO with
its code only (its details can name users or items) and at DEBUG with the details.

Example::

    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor("device")])
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from recsys.errors import NotFoundError, RecsysError, ValidationError
from recsys.serving.interceptor import Behavior, UnaryInterceptor

logger = logging.getLogger(__name__)

MAX_DETAILS = 1000  # characters of an error message sent to a client (ids can be long)


class NotReadyError(RecsysError):
    """The service is still loading its models (or shutting down); retry shortly."""


class OverloadedError(RecsysError):
    """Too many requests are queued; back off and retry."""


class Undecodable:
    """What a request deserialiser returns for bytes that do not parse (instead of
    raising, which gRPC would answer with UNKNOWN); the wrapped handler answers it with
    INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize`` returning :class:`Undecodable` instead of raising."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything a parser raises on junk
            return Undecodable(f"{type(exc).__name__}: {exc}"[:200])

    return parse


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, details) for an exception raised by a handler (see the module table).

    For unexpected exceptions the details are generic: internals never reach a client.
    """
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, NotReadyError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, RecsysError) and getattr(exc, "retryable", False):
        return grpc.StatusCode.UNAVAILABLE, str(exc)  # transient: retry with back-off
    if isinstance(exc, RecsysError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, "internal error"


class ErrorMappingInterceptor(UnaryInterceptor):
    """Server interceptor: domain errors -> status codes (one per server).

    Args:
        service_label: a name for the logs ("device", "cloud").
    """

    def __init__(self, service_label: str = "") -> None:
        super().__init__()
        self.service_label = service_label
        self.counts: dict[str, int] = {}  # status code name -> errors mapped (for tests/metrics)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with its behaviour wrapped in the error mapping (built once per method)."""
        behavior: Behavior = handler.unary_unary

        async def mapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if isinstance(request, Undecodable):
                    raise ValidationError(
                        f"malformed request: the bytes are not a {method} request "
                        f"({request.reason})"
                    )
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                code, details = status_for(exc)
                self.counts[code.name] = self.counts.get(code.name, 0) + 1
                if code is grpc.StatusCode.INTERNAL:
                    error_id = uuid.uuid4().hex[:12]
                    logger.exception(
                        "%s %s failed (error id %s)", self.service_label, method, error_id
                    )
                    details = f"internal error (id {error_id}); see the server log"
                else:
                    if len(details) > MAX_DETAILS:
                        details = details[: MAX_DETAILS - 3] + "..."
                    logger.info("%s %s -> %s", self.service_label, method, code.name)
                    logger.debug("%s %s -> %s: %s", self.service_label, method, code.name, details)
                await context.abort(code, details)

        return grpc.unary_unary_rpc_method_handler(
            mapped,
            request_deserializer=safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
