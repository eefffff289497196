"""Download official dataset archives (``recsys data fetch``) with pooch, checksum-verified.

Only MovieLens 100K is published as a plain download; the other datasets come from
research repositories and must be placed by hand (the error says where).

The archive is downloaded by :func:`pooch.retrieve` (a temporary file moved into place,
a tqdm progress bar, and the SHA-256 checked against the registered hash: a changed
release, a proxy's login page or a truncated download is refused and deleted). A second
fetch reuses a cached archive whose hash still matches. The archive is then extracted by
:func:`_safe_extract` into a staging folder renamed to ``DEST/ml-100k`` (hand-written on
purpose: ``pooch.Unzip`` neither refuses paths outside the folder nor replaces the
dataset folder atomically nor checks the required files), so an interrupted fetch
leaves no partial dataset behind. The GroupLens layout (``u.data``, ``u.item``) is read
by :mod:`recsys.data.movielens`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import pooch

from recsys.data.atomic import replace_dir
from recsys.errors import DataFormatError, RecsysError

logger = logging.getLogger(__name__)

REGISTERED: Final = "registered"  # fetch_dataset's default: the archive's known hash


@dataclass(frozen=True)
class Archive:
    """A downloadable dataset archive.

    Attributes:
        url: the official download address.
        folder: the folder the archive unpacks to (and the raw folder name).
        required: files that must be in ``folder`` after extraction.
        known_hash: pooch's ``"sha256:<hex>"`` of the official archive; None only where
            no published hash is known (then the download is not verified: say why in
            the entry's comment).
    """

    url: str
    folder: str
    required: tuple[str, ...]
    known_hash: str | None


ARCHIVES: dict[str, Archive] = {
    "ml-100k": Archive(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        folder="ml-100k",
        required=("u.data", "u.item"),
        # the stable GroupLens release (4,924,029 bytes; GroupLens' published MD5 is
        # 0e33842e24a9c977be4e0107933c0723); this SHA-256 is the one independent
        # projects record for the same file
        known_hash="sha256:50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    ),
}


def _copy_local(url: str, output_file: str, _pooch: Any) -> None:
    """pooch downloader for ``file://`` URLs (a mirror on a shared disk; the tests);
    pooch passes the temporary file it then verifies and moves into place."""
    shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path), output_file)


def _downloader(url: str, timeout: float) -> Any:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "file":
        return _copy_local
    if scheme in ("http", "https"):
        return pooch.HTTPDownloader(progressbar=True, timeout=timeout)
    raise RecsysError(f"cannot download {url!r}: give an http(s):// or file:// URL")


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
    name: str,
    dest: str | Path,
    url: str | None = None,
    *,
    known_hash: str | None = REGISTERED,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and unpack dataset ``name`` into ``dest``; return ``dest/<folder>``.

    Args:
        name: a key of :data:`ARCHIVES` (``ml-100k``).
        dest: the raw data directory (the folder that will hold ``ml-100k/`` and the
            downloaded ``ml-100k.zip``).
        url: override the download address (a mirror of the same archive, ``file://``).
        known_hash: the hash the download must have, in pooch's form
            (``"sha256:<hex>"``); by default the registered hash of the official
            archive; None skips the check (an archive built locally, e.g. in tests).
        timeout: seconds to wait for the server.

    Raises:
        RecsysError: unknown name, or the download failed (with manual instructions).
        DataFormatError: the download does not match the hash, is not a zip or lacks the
            expected files.

    Example::

        folder = fetch_dataset("ml-100k", "~/.cache/recsys-llm-edit/raw")
        # folder / "u.data" now exists; `recsys data prepare ml-100k` reads it
    """
    if name not in ARCHIVES:
        raise RecsysError(f"cannot fetch {name!r}: downloadable datasets are {', '.join(ARCHIVES)}")
    spec = ARCHIVES[name]
    url = url or spec.url
    expected = spec.known_hash if known_hash == REGISTERED else known_hash
    root = Path(dest).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / spec.folder
    cached = root / f"{spec.folder}.zip"
    if expected is None:  # nothing to check a cached copy against: download again
        cached.unlink(missing_ok=True)
    logger.info("downloading %s from %s", name, url)
    try:
        zip_path = Path(
            pooch.retrieve(
                url,
                expected,
                fname=cached.name,
                path=root,
                downloader=_downloader(url, timeout),
            )
        )
    except OSError as exc:  # also requests' errors (connection, HTTP status, bad URL)
        reason = getattr(exc, "reason", exc)
        raise RecsysError(
            f"could not download {name} from {url} ({reason}). Download it manually from "
            f"{spec.url}, unzip it so that {target / spec.required[0]} exists (or put the "
            f"folder under the directory given by --data-dir / RECSYS_DATA_DIR), then run "
            f"`recsys data prepare {name}`"
        ) from None
    except ValueError as exc:  # pooch: the download's hash is not the known hash
        raise DataFormatError(
            url,
            None,
            f"not the official {spec.folder}.zip ({exc}); download it from {spec.url}",
        ) from None
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", dir=root))
    try:
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
        except DataFormatError:
            zip_path.unlink(missing_ok=True)  # a retry downloads again
            raise
        replace_dir(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("fetched %s into %s", name, target)
    return target
