"""Signing keys of the services' tokens: key files, and the key ring a server verifies with.

A key is a key id (``kid``, named in each token's header) and 32 random bytes for HS256,
kept in a small JSON file readable by its owner only (``recsys auth keygen``). A server
is given key files and/or directories of ``*.key`` files; :class:`KeyRing` holds at most
:data:`MAX_KEYS` of them (the old and the new key during a rotation) and re-reads them
when they change, so a rotation needs no restart. Tokens themselves are
:mod:`recsys.serving.auth`.

Example::

    write_key(generate_key("k-2026-12"), "keys/k-2026-12.key")
    ring = KeyRing(["keys"])          # every *.key in keys/
    ring.get("k-2026-12").secret
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

ALGORITHM = "HS256"
MAX_KEYS = 2  # an old and a new key during a rotation
KEY_SUFFIX = ".key"
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash


@dataclass(frozen=True)
class SigningKey:
    """One HS256 key: its id (the token header's ``kid``) and its secret bytes."""

    kid: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.kid or len(self.kid) > 64 or any(c.isspace() for c in self.kid):
            raise ValidationError(f"key id must be 1..64 characters without spaces: {self.kid!r}")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValidationError(
                f"key {self.kid!r}: secret of {len(self.secret)} bytes; HS256 needs at least "
                f"{MIN_SECRET_BYTES} (make one with `recsys auth keygen`)"
            )


def generate_key(kid: str | None = None) -> SigningKey:
    """A fresh random key (32 bytes from :mod:`secrets`); ``kid`` default: ``k-`` + 8 hex."""
    return SigningKey(kid or f"k-{secrets.token_hex(4)}", secrets.token_bytes(32))


def write_key(key: SigningKey, path: str | Path) -> Path:
    """Write ``key`` as JSON readable by its owner only (0600); refuses to overwrite."""
    path = Path(path)
    text = json.dumps(
        {
            "kid": key.kid,
            "alg": ALGORITHM,
            "secret": base64.urlsafe_b64encode(key.secret).decode("ascii"),
        }
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValidationError(
            f"{path} exists; choose another file (keys are never overwritten)"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


def read_key(path: str | Path) -> SigningKey:
    """The key in ``path`` (written by :func:`write_key`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("alg", ALGORITHM) != ALGORITHM:
            raise ValidationError(f"key file {path}: algorithm {data['alg']!r}, not {ALGORITHM}")
        secret = base64.urlsafe_b64decode(data["secret"])
        kid = str(data["kid"])
    except OSError as exc:
        raise ValidationError(f"cannot read the key file {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValidationError(
            f"{path} is not a key file (JSON with kid and secret; `recsys auth keygen`)"
        ) from None
    if os.name == "posix" and path.stat().st_mode & 0o077:
        logger.warning("key file %s is readable by others; chmod 600 it", path)
    return SigningKey(kid, secret)


def key_files(paths: Sequence[str | Path]) -> list[Path]:
    """The key files of ``paths``: each a key file, or a directory of ``*.key`` files."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.name.endswith(KEY_SUFFIX)))
        else:
            found.append(p)
    return found


class KeyRing:
    """The keys a server accepts (1..:data:`MAX_KEYS`), by key id, re-read when they change.

    Args:
        paths: key files and/or directories of ``*.key`` files.
        reload_s: how often (at most) the files are checked for changes; 0 = never.

    Raises:
        ValidationError: no key, more than :data:`MAX_KEYS`, two keys with one id, or an
            unreadable key file (at start; a bad reload keeps the previous keys and logs).
    """

    def __init__(self, paths: Sequence[str | Path], reload_s: float = 2.0) -> None:
        self.paths = [Path(p) for p in paths]
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._signature = self._stat()
        self.keys = self._load()

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for p in key_files(self.paths):
            try:
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(p), -1, -1))
        return tuple(out)

    def _load(self) -> dict[str, SigningKey]:
        files = key_files(self.paths)
        if not files:
            raise ValidationError(f"no key files in {[str(p) for p in self.paths]}")
        if len(files) > MAX_KEYS:
            raise ValidationError(
                f"{len(files)} keys configured ({', '.join(map(str, files))}); at most "
                f"{MAX_KEYS} (the old and the new one during a rotation)"
            )
        keys: dict[str, SigningKey] = {}
        for f in files:
            key = read_key(f)
            if key.kid in keys:
                raise ValidationError(f"two keys with the id {key.kid!r}; give each its own")
            keys[key.kid] = key
        return keys

    def maybe_reload(self) -> None:
        """Re-read the keys if a file changed (at most once per ``reload_s``)."""
        now = time.monotonic()
        if self.reload_s <= 0 or now - self._checked < self.reload_s:
            return
        with self._lock:
            self._checked = now
            signature = self._stat()
            if signature == self._signature:
                return
            self._signature = signature
            try:
                keys = self._load()
            except ValidationError as exc:
                logger.error("auth keys not reloaded, keeping %s: %s", sorted(self.keys), exc)
                return
            logger.info("auth keys reloaded: %s (were %s)", sorted(keys), sorted(self.keys))
            self.keys = keys

    def get(self, kid: str) -> SigningKey | None:
        return self.keys.get(kid)
