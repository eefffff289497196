"""Download official dataset archives (``recsys data fetch``).

Only MovieLens 100K is published as a plain download; the other datasets come from
research repositories and must be placed by hand (the error says where).

The archive is streamed to a temporary file beside the destination (with a tqdm
progress bar), moved into place atomically, checked, and extracted into a temporary
folder that is then renamed to ``DEST/ml-100k``; an interrupted fetch leaves no partial
dataset behind. The GroupLens layout (``u.data``, ``u.item``) is read by
:mod:`recsys.data.movielens`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from recsys.errors import DataFormatError, RecsysError

logger = logging.getLogger(__name__)

CHUNK = 1 << 16


@dataclass(frozen=True)
class Archive:
    """A downloadable dataset archive.

    Attributes:
        url: the official download address.
        folder: the folder the archive unpacks to (and the raw folder name).
        required: files that must be in ``folder`` after extraction.
    """

    url: str
    folder: str
    required: tuple[str, ...]


ARCHIVES: dict[str, Archive] = {
    "ml-100k": Archive(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        folder="ml-100k",
        required=("u.data", "u.item"),
    ),
}


def _download(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` into ``dest`` via a temp file in the same folder, then rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _safe_extract(archive: Path, into: Path) -> None:
    """Extract ``archive`` into ``into``, refusing members that would land outside it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                parts = PurePosixPath(member).parts
                if member.startswith(("/", "\\")) or ".." in parts or ":" in member:
                    raise DataFormatError(archive, None, f"unsafe path {member!r} in the archive")
            zf.extractall(into)
    except zipfile.BadZipFile as exc:
        raise DataFormatError(archive, None, f"not a valid zip archive ({exc})") from None


def fetch_dataset(
    name: str, dest: str | Path, url: str | None = None, *, timeout: float = 60.0
) -> Path:
    """Download and unpack dataset ``name`` into ``dest``; return ``dest/<folder>``.

    Args:
        name: a key of :data:`ARCHIVES` (``ml-100k``).
        dest: the raw data directory (the folder that will hold ``ml-100k/``).
        url: override the download address (mirrors, tests with ``file://``).
        timeout: seconds to wait for the server.

    Raises:
        RecsysError: unknown name, or the download failed (with manual instructions).
        DataFormatError: the archive is not a zip or lacks the expected files.

    Example::

        folder = fetch_dataset("ml-100k", "~/.cache/recsys-llm-edit/raw")
        # folder / "u.data" now exists; `recsys data prepare ml-100k` reads it
    """
    if name not in ARCHIVES:
        raise RecsysError(f"cannot fetch {name!r}: downloadable datasets are {', '.join(ARCHIVES)}")
    spec = ARCHIVES[name]
    url = url or spec.url
    root = Path(dest).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / spec.folder
    zip_path = root / f"{spec.folder}.zip"
    logger.info("downloading %s from %s", name, url)
    try:
        _download(url, zip_path, timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: malformed URL
        reason = getattr(exc, "reason", exc)
        raise RecsysError(
            f"could not download {name} from {url} ({reason}). Download it manually from "
            f"{spec.url}, unzip it so that {target / spec.required[0]} exists (or put the "
            f"folder under the directory given by --data-dir / RECSYS_DATA_DIR), then run "
            f"`recsys data prepare {name}`"
        ) from None
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", dir=root))
    try:
        _safe_extract(zip_path, staging)
        extracted = staging / spec.folder
        if not extracted.is_dir():  # an archive without the top folder
            extracted = staging
        missing = [f for f in spec.required if not (extracted / f).is_file()]
        if missing:
            raise DataFormatError(
                zip_path, None, f"archive lacks {spec.folder}/{', '.join(missing)}"
            )
        if target.exists():
            old = root / f".{spec.folder}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(extracted, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("fetched %s into %s", name, target)
    return target
