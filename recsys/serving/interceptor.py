"""The base of the servers' interceptors: wrap each unary method's handler once.

Every server interceptor of the project (authentication, error mapping, RPC metrics,
tracing) changes the behaviour of unary-unary handlers only. grpc.aio asks the
interceptor for a handler on every call, so :class:`UnaryInterceptor` keeps the wrapped
handler per method (rebuilt only if the service hands out another handler) and passes
streaming handlers (health ``Watch``) through untouched. A subclass writes
:meth:`UnaryInterceptor.wrap` and, if it applies to only some calls,
:meth:`UnaryInterceptor.applies`.

Example::

    class Timing(UnaryInterceptor):
        def wrap(self, method, handler):
            behavior = handler.unary_unary
            async def timed(request, context):
                t0 = time.perf_counter()
                try:
                    return await behavior(request, context)
                finally:
                    log(method, time.perf_counter() - t0)
            return unary_handler(timed, handler)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


def unary_handler(behavior: Behavior, like: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A unary-unary handler running ``behavior`` with ``like``'s (de)serialisers."""
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=like.request_deserializer,
        response_serializer=like.response_serializer,
    )


class UnaryInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary-unary handlers with :meth:`wrap`, once per method (see the module)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def applies(self, method: str) -> bool:
        """Whether this call's unary handler is wrapped (default: every one)."""
        return True

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` (unary-unary) with this interceptor's behaviour around it."""
        raise NotImplementedError

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """:meth:`wrap` of ``handler``, built once per (method, handler)."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        out = self.wrap(method, handler)
        self._wrapped[method] = (handler, out)
        return out

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not self.applies(method):
            return handler
        return self.wrapped(method, handler)
