"""Shared-token check on the device-to-cloud link (gRPC metadata).

The device sends ``authorization: Bearer <token>`` with every call
(:func:`token_metadata`); the cloud's :class:`TokenAuthInterceptor` compares it in
constant time and answers UNAUTHENTICATED otherwise. Health checking and reflection stay
open (load balancers and ``grpcurl`` probe them without credentials). Use it together
with TLS (:mod:`recsys.serving.server`) anywhere but loopback: the token is a bearer
secret.

Example::

    server = grpc.aio.server(interceptors=[TokenAuthInterceptor(token), ErrorMappingInterceptor()])
    await stub.GenerateEdit(request, metadata=token_metadata(token), timeout=1.0)
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

METADATA_KEY = "authorization"
SCHEME = "Bearer "
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (empty when there is none)."""
    return ((METADATA_KEY, SCHEME + token),) if token else ()


def read_token(path: str | Path | None) -> str | None:
    """The token in ``path`` (surrounding whitespace stripped), or None without a path.

    A token file keeps the secret out of ``ps`` output and shell history.
    """
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValidationError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise ValidationError(f"token file {path} must hold one token without spaces")
    return token


def _presented(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return text[len(SCHEME) :] if text.startswith(SCHEME) else None
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    Args:
        token: the shared secret.
        open_prefixes: method-name prefixes that need no token (health, reflection).
    """

    def __init__(self, token: str, open_prefixes: Sequence[str] = OPEN_PREFIXES) -> None:
        if not token:
            raise ValidationError("the shared token must be non-empty")
        self._token = token.encode("utf-8")
        self.open_prefixes = tuple(open_prefixes)
        self.rejected = 0

    def allows(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        """True when ``method`` is open or ``metadata`` carries the right token."""
        if method.startswith(self.open_prefixes):
            return True
        presented = _presented(metadata)
        return presented is not None and hmac.compare_digest(presented.encode("utf-8"), self._token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if self.allows(method, handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        self.rejected += 1
        missing = _presented(handler_call_details.invocation_metadata) is None
        logger.warning("rejected %s: %s token", method, "missing" if missing else "wrong")
        details = (
            "missing shared token: send 'authorization: Bearer <token>' metadata"
            if missing
            else "wrong shared token"
        )

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

        return grpc.unary_unary_rpc_method_handler(deny)
