"""Fixtures shared by the whole suite.

* ``raw_data_dir``: the raw datasets folder (``../shared/data`` beside the project, or
  ``$RECSYS_DATA_DIR``); tests that need it skip with a reason when it is absent.
* ``session_cache``: one cache directory for the whole session, so ml-100k is prepared
  (and its text embedded) once per test run, not once per test.
* ``ml100k``: the prepared ml-100k :class:`recsys.data.Dataset`.
* ``bg``: an asyncio event loop in a daemon thread (:class:`BackgroundLoop`, one per test
  module), so tests start in-process gRPC servers and use the plain synchronous stubs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from recsys import settings

T = TypeVar("T")


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


class BackgroundLoop:
    """An event loop running in a daemon thread; :meth:`run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()
