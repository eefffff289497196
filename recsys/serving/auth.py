"""Signed per-device credentials (JWT, HS256) and the server interceptor that checks them.

A token is a JWT signed with HS256 by one of the server's keys; its header names the key
(``kid``) and its claims say who the caller is:

========  ==================================================================
``sub``   the device id (for an operator: the operator's name)
``role``  ``"device"`` (acts for its own id only) or ``"operator"`` (any id)
``iat``   issued at, unix seconds
``exp``   expiry, unix seconds (verified with a small clock-skew leeway)
========  ==================================================================

Keys (:mod:`recsys.serving.keys`) are small JSON files written by ``recsys auth
keygen``; a server is given key files or directories of ``*.key`` files
(:class:`AuthConfig`) and accepts a token signed by any of them (at most two, so a
rotation has exactly an old and a new key). The server re-reads them when they change
(at most once per ``reload_s``), so a rotation needs no restart: add the new key,
reissue the tokens with it, remove the old key.

:class:`AuthInterceptor` (installed before the error-mapping interceptor) checks every
call except health checking and reflection:

* no token, an unparsable, forged (no key, or a wrong signature) or expired one:
  UNAUTHENTICATED, before the handler runs;
* a method that acts for a device or user (:class:`AuthPolicy`) whose request names
  another id than the token's ``sub``, from a ``device`` token: PERMISSION_DENIED,
  before the handler runs (so nothing changes);
* an undecodable request (after a valid token): passed on, and the error mapping answers
  INVALID_ARGUMENT.

The client sends ``authorization: Bearer <token>`` (:func:`token_metadata`). Use TLS
(:mod:`recsys.serving.server`) anywhere but loopback: a token is a bearer secret until it
expires.

Example::

    key = generate_key("k1"); write_key(key, "k1.key")   # recsys.serving.keys
    token = issue_token(key, "phone-42", role="device", ttl_s=86400)
    interceptor = AuthInterceptor(TokenVerifier(KeyRing(["k1.key"])), AuthPolicy({
        "/recsys.cloud.v1.AdaptationService/GenerateEdit": "device_id"}))
    server = grpc.aio.server(interceptors=[interceptor, ErrorMappingInterceptor()])
    await stub.GenerateEdit(request, metadata=token_metadata(token), timeout=1.0)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio
import jwt

from recsys.errors import ValidationError
from recsys.serving.errors import Undecodable
from recsys.serving.interceptor import Continuation, UnaryInterceptor, unary_handler
from recsys.serving.keys import ALGORITHM, KeyRing, SigningKey
from recsys.serving.redact import id_ref
from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)

METADATA_KEY = "authorization"
SCHEME = "Bearer "
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
ROLES = ("device", "operator")

Role = Literal["device", "operator"]


class AuthError(Exception):
    """A token that does not authenticate its caller (UNAUTHENTICATED); the message says why."""


# ---- tokens -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """Who a verified token says the caller is."""

    subject: str
    role: Role
    expires_at: int
    kid: str

    def may_act_for(self, subject_id: str) -> bool:
        """An operator acts for anyone; a device for its own id only."""
        return self.role == "operator" or subject_id == self.subject


def issue_token(
    key: SigningKey,
    subject: str,
    *,
    role: Role = "device",
    ttl_s: float = 24 * 3600,
    now: float | None = None,
) -> str:
    """A token for ``subject`` (device id or operator name) signed with ``key``."""
    if not subject or len(subject) > 200:
        raise ValidationError(f"device id must be 1..200 characters, got {subject!r}")
    if role not in ROLES:
        raise ValidationError(f"role must be one of {ROLES}, got {role!r}")
    if ttl_s <= 0:
        raise ValidationError(f"the token's lifetime must be > 0 s, got {ttl_s}")
    iat = int(time.time() if now is None else now)
    claims = {"sub": subject, "role": role, "iat": iat, "exp": iat + int(ttl_s)}
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.kid})


class TokenVerifier:
    """Verifies tokens against a :class:`KeyRing` (signature, ``exp`` with ``leeway_s``,
    claims); verified tokens are cached until they expire, so a call costs a dict lookup.

    Raises (from :meth:`verify`):
        AuthError: with the reason (malformed, unknown key, bad signature, expired, claims).
    """

    def __init__(self, ring: KeyRing, leeway_s: float = 30.0, cache_size: int = 4096) -> None:
        self.ring = ring
        self.leeway_s = leeway_s
        self.cache_size = cache_size
        self._cache: dict[str, Identity] = {}
        self._cache_keys = dict(ring.keys)

    def verify(self, token: str, now: float | None = None) -> Identity:
        now = time.time() if now is None else now
        self.ring.maybe_reload()
        if self.ring.keys is not self._cache_keys:  # keys changed: forget what they signed
            self._cache.clear()
            self._cache_keys = self.ring.keys
        cached = self._cache.get(token)
        if cached is not None:
            if now > cached.expires_at + self.leeway_s:
                del self._cache[token]
                raise AuthError("token expired")
            return cached
        identity = self._decode(token, now)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[token] = identity
        return identity

    def _decode(self, token: str, now: float) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        if header.get("alg") != ALGORITHM:
            raise AuthError(f"token algorithm {header.get('alg')!r} is not {ALGORITHM}")
        key = self.ring.get(str(header.get("kid", "")))
        if key is None:
            raise AuthError("token signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                key.secret,
                algorithms=[ALGORITHM],
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature does not verify") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        role, sub = claims.get("role"), claims.get("sub")
        if role not in ROLES or not isinstance(sub, str) or not sub:
            raise AuthError("token claims lack a role (device|operator) or a subject")
        if claims["iat"] > now + self.leeway_s:
            raise AuthError("token issued in the future")
        return Identity(sub, role, int(claims["exp"]), key.kid)


# ---- the client side --------------------------------------------------------------------------
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


def token_expiry(token: str) -> int | None:
    """The ``exp`` claim of ``token`` read WITHOUT verifying it (for a client's reminder to
    renew; never for a decision), or None when it has none or does not parse."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.InvalidTokenError:
        return None
    return int(exp) if isinstance(exp, (int, float)) else None


def _presented(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return text[len(SCHEME) :] if text.startswith(SCHEME) else ""
    return None


# ---- the server side --------------------------------------------------------------------------
@config_dataclass
class AuthConfig:
    """A server's authentication (off without keys).

    Attributes:
        keys: key files and/or directories of ``*.key`` files (empty = no authentication:
            every caller is trusted; for loopback tests and replays only).
        leeway_s: clock skew tolerated on ``exp`` / ``iat``, seconds.
        reload_s: how often the key files are checked for changes (0 = read once).
    """

    keys: tuple[str, ...] = ()
    leeway_s: float = Field(30.0, ge=0.0, le=600.0)
    reload_s: float = Field(2.0, ge=0.0)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True)
class AuthPolicy:
    """Which request field names the device or user a method acts for.

    ``acts_for[method]`` is the field (``"device_id"``, ``"user_id"``) whose value must be
    the token's subject unless the token is an operator's; an empty value in the request
    (e.g. a device-wide GetStatus) needs only a valid token. Methods not listed need a
    valid token; ``open_prefixes`` need none.
    """

    acts_for: Mapping[str, str] = field(default_factory=dict)
    open_prefixes: tuple[str, ...] = OPEN_PREFIXES


def auth_interceptors(config: AuthConfig, policy: AuthPolicy) -> list[grpc.aio.ServerInterceptor]:
    """``[AuthInterceptor]`` when ``config`` has keys, else ``[]`` (logged as a warning)."""
    if not config.enabled:
        logger.warning("no auth keys: every caller is trusted (give --auth-key off loopback)")
        return []
    ring = KeyRing(config.keys, reload_s=config.reload_s)
    return [AuthInterceptor(TokenVerifier(ring, leeway_s=config.leeway_s), policy)]


class AuthInterceptor(UnaryInterceptor):
    """UNAUTHENTICATED without a valid token, PERMISSION_DENIED when a device token's
    subject is not the id the request acts for (see the module docstring).

    Install it first, before :class:`~recsys.serving.errors.ErrorMappingInterceptor`:
    its checks run before the handler and before the error mapping.

    Attributes:
        counts: "unauthenticated" / "permission_denied" -> calls rejected (for tests).
    """

    def __init__(self, verifier: TokenVerifier, policy: AuthPolicy | None = None) -> None:
        super().__init__()
        self.verifier = verifier
        self.policy = policy or AuthPolicy()
        self.counts = {"unauthenticated": 0, "permission_denied": 0}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith(self.policy.open_prefixes) or handler is None:
            return handler
        if handler.unary_unary is None:  # every project RPC is unary; deny anything else
            return self._deny_stream(method)
        return self.wrapped(method, handler)

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Identity:
        """The caller's identity from call metadata; AuthError when there is none."""
        token = _presented(metadata)
        if token is None:
            raise AuthError(f"missing token: send '{METADATA_KEY}: {SCHEME}<token>' metadata")
        if not token:
            raise AuthError(f"the {METADATA_KEY} metadata must be '{SCHEME}<token>'")
        return self.verifier.verify(token)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        id_field = self.policy.acts_for.get(method)

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                identity = self.authenticate(context.invocation_metadata())
            except AuthError as exc:
                self.counts["unauthenticated"] += 1
                logger.warning("%s rejected: %s", method, exc)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            if id_field and not isinstance(request, Undecodable):
                wanted = getattr(request, id_field)
                if wanted and not identity.may_act_for(wanted):
                    self.counts["permission_denied"] += 1
                    logger.warning(
                        "%s denied: %s token of %s for another %s %s",
                        method,
                        identity.role,
                        id_ref(identity.subject),
                        id_field,
                        id_ref(wanted),
                    )
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"a device token acts for its own id (its subject) only, not for "
                        f"the {id_field} in this request; an operator token acts for any",
                    )
            return await behavior(request, context)

        return unary_handler(checked, handler)

    def _deny_stream(self, method: str) -> grpc.RpcMethodHandler:
        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method} is not open")

        return grpc.unary_unary_rpc_method_handler(deny)
