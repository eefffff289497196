"""User and device ids in logs: a short hash, never the id itself.

INFO (and WARNING) lines name users by :func:`id_ref`, the first 12 hex digits of the
id's SHA-256: enough to follow one user through a log and to find their lines once the id
is known (``id_ref("u42")``), not enough to read the id back from the log without a
guess list. Error details sent to a caller may still carry the id it sent.

Example::

    logger.info("new user %s", id_ref(user_id))   # "new user #9f86d081884c"
"""

from __future__ import annotations

import hashlib

REF_HEX = 12  # 48 bits: collisions negligible below millions of ids


def id_ref(value: str) -> str:
    """``#`` + the first :data:`REF_HEX` hex digits of SHA-256 of ``value`` (UTF-8)."""
    return "#" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:REF_HEX]
