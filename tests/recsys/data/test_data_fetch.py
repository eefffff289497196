"""`data fetch`: download from a file:// URL (offline: never the internet), verify the
hash, extract, load; clear failures."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from recsys.data.fetch import ARCHIVES, fetch_dataset
from recsys.data.movielens import load_ml100k
from recsys.data.registry import load_dataset
from recsys.errors import DataFormatError, RecsysError


@pytest.fixture
def grouplens_zip(make_grouplens: Callable[..., Path], tmp_path: Path) -> Path:
    """A small zip laid out like the official ml-100k.zip (top folder ml-100k/)."""
    folder = make_grouplens(tmp_path / "src")
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"ml-100k/{f.name}")
    return archive


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_from_file_url_then_load(grouplens_zip: Path, tmp_path: Path) -> None:
    dest = tmp_path / "raw"
    folder = fetch_dataset("ml-100k", dest, url=grouplens_zip.as_uri(), known_hash=None)
    assert folder == dest / "ml-100k"
    assert (folder / "u.data").is_file() and (folder / "u.item").is_file()
    assert not list(dest.glob(".*"))  # no temp files or staging folders left behind
    ds = load_ml100k(folder)
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 4, 4)
    # a second fetch replaces the folder in place
    again = fetch_dataset("ml-100k", dest, url=grouplens_zip.as_uri(), known_hash=None)
    assert again == folder
    via_registry = load_dataset("ml-100k", data_dir=dest, cache_dir=tmp_path / "cache")
    assert via_registry.fingerprint() == ds.fingerprint()


def test_a_verified_archive_is_cached(grouplens_zip: Path, tmp_path: Path) -> None:
    dest = tmp_path / "raw"
    digest = sha256(grouplens_zip)
    fetch_dataset("ml-100k", dest, url=grouplens_zip.as_uri(), known_hash=digest)
    assert sha256(dest / "ml-100k.zip") == digest
    # the cached archive still has the hash: no download (the URL is gone)
    gone = (tmp_path / "gone.zip").as_uri()
    assert (fetch_dataset("ml-100k", dest, url=gone, known_hash=digest) / "u.data").is_file()
    # without a hash there is nothing to trust the cache with: it downloads again
    with pytest.raises(RecsysError, match="could not download"):
        fetch_dataset("ml-100k", dest, url=gone, known_hash=None)


def test_the_registered_hash_refuses_another_archive(grouplens_zip: Path, tmp_path: Path) -> None:
    assert ARCHIVES["ml-100k"].known_hash.startswith("sha256:")
    dest = tmp_path / "raw"
    with pytest.raises(DataFormatError, match=r"not the official ml-100k\.zip .*hash") as exc:
        fetch_dataset("ml-100k", dest, url=grouplens_zip.as_uri())  # a mirror must match
    assert ARCHIVES["ml-100k"].url in str(exc.value)
    assert not (dest / "ml-100k").exists() and not (dest / "ml-100k.zip").exists()


def test_unsupported_url_scheme(tmp_path: Path) -> None:
    with pytest.raises(RecsysError, match="http"):
        fetch_dataset("ml-100k", tmp_path, url="gopher://example.org/ml-100k.zip")


def test_network_error_says_download_manually(tmp_path: Path) -> None:
    with pytest.raises(RecsysError) as exc:
        fetch_dataset("ml-100k", tmp_path / "raw", url=(tmp_path / "missing.zip").as_uri())
    msg = str(exc.value)
    assert "manually" in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in msg
    assert str(tmp_path / "raw" / "ml-100k" / "u.data") in msg
    assert not (tmp_path / "raw" / "ml-100k").exists()


def test_not_a_zip(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.zip"
    bogus.write_text("<html>proxy login page</html>")
    with pytest.raises(DataFormatError, match="not a valid zip"):
        fetch_dataset("ml-100k", tmp_path / "raw", url=bogus.as_uri(), known_hash=None)
    assert not (tmp_path / "raw" / "ml-100k.zip").exists()  # a retry downloads again


def test_archive_without_expected_files(tmp_path: Path) -> None:
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-100k/README", "nothing here")
    with pytest.raises(DataFormatError, match=r"u\.data"):
        fetch_dataset("ml-100k", tmp_path / "raw", url=archive.as_uri(), known_hash=None)


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escaped.txt", "x")
    with pytest.raises(DataFormatError, match="unsafe path"):
        fetch_dataset("ml-100k", tmp_path / "raw" / "deep", url=archive.as_uri(), known_hash=None)
    assert not (tmp_path / "escaped.txt").exists()


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(RecsysError, match="ml-100k"):
        fetch_dataset("tiktok", tmp_path)
