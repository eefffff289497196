"""Fixtures shared by the whole suite.

* ``raw_data_dir``: the raw datasets folder (``../shared/data`` beside the project, or
  ``$RECSYS_DATA_DIR``); tests that need it skip with a reason when it is absent.
* ``session_cache``: one cache directory for the whole session, so ml-100k is prepared
  (and its text embedded) once per test run, not once per test.
* ``ml100k``: the prepared ml-100k :class:`recsys.data.Dataset`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys import settings


@pytest.fixture(scope="session")
def raw_data_dir() -> Path:
    path = settings.raw_data_dir()
    if not (path / "ml-100k").is_dir():
        pytest.skip(f"raw datasets not found at {path}; set RECSYS_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir shared by the session (``$RECSYS_TEST_CACHE`` to keep it across runs)."""
    keep = os.environ.get("RECSYS_TEST_CACHE")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def ml100k(raw_data_dir: Path, session_cache: Path):
    from recsys.data.registry import load_dataset

    return load_dataset("ml-100k", data_dir=raw_data_dir, cache_dir=session_cache)
