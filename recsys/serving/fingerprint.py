"""Model versions on the wire: the fingerprint of a checkpoint file.

The device sends the fingerprint of its ranker checkpoint with every edit request; the
cloud compares it with the checkpoint its adaptor was trained against, so an edit is
never generated for a head it was not made for. Same bytes, same version: a copied file
keeps its version, a retrained one gets a new one.

Example::

    file_fingerprint("artifacts/ml-100k/ranker-time.pt")   # 'a3f9c2...' (16 hex)
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes (read in 1 MB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's bytes, first 16 hex digits."""
    return file_sha256(path)[:16]
