"""Engine set-up: URL checks, the default URL from settings, SQLite pragmas and the
``BEGIN IMMEDIATE`` write lock."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import IntegrityError, OperationalError

from codebook.store import migrate
from codebook.store.db import SQLITE_BUSY_TIMEOUT_S, WRITE_TRANSACTION, make_engine, parse_url
from codebook.store.models import DeviceAssignment, utcnow
from recsys import settings
from recsys.errors import ValidationError


def test_url_checks() -> None:
    assert parse_url("postgresql://u@h:5/db").drivername == "postgresql+psycopg"
    assert parse_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    with pytest.raises(ValidationError, match="unsupported database 'mysql'"):
        parse_url("mysql://u@h/db")
    with pytest.raises(ValidationError, match="file"):
        parse_url("sqlite://")
    with pytest.raises(ValidationError, match="file"):
        parse_url("sqlite:///:memory:")
    with pytest.raises(ValidationError, match="bad database URL"):
        parse_url("not a url")


def test_default_url_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECSYS_DATABASE_URL", raising=False)
    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path))
    assert settings.database_url() == f"sqlite:///{tmp_path / 'store.sqlite'}"
    assert parse_url(None).database == str(tmp_path / "store.sqlite")
    monkeypatch.setenv("RECSYS_DATABASE_URL", "postgresql+psycopg://u@h/db")
    assert settings.database_url() == "postgresql+psycopg://u@h/db"
    assert settings.database_url("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setenv("RECSYS_TEST_POSTGRES_URL", "postgresql+psycopg://t@h/db")
    assert settings.postgres_test_url() == "postgresql+psycopg://t@h/db"
    monkeypatch.setenv("RECSYS_TEST_POSTGRES_URL", "")
    assert settings.postgres_test_url() is None


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'db.sqlite'}")  # folder created
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == int(
                SQLITE_BUSY_TIMEOUT_S * 1000
            )
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        engine.dispose()


def test_sqlite_enforces_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                insert(DeviceAssignment).values(
                    device_id="d", prototype_id=123, assigned_at=utcnow()
                )
            )
    finally:
        engine.dispose()


def test_write_transaction_takes_sqlite_write_lock_at_begin(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    holder = make_engine(url)
    waiter = make_engine(url, sqlite_busy_timeout_s=0.1)
    try:
        with holder.connect().execution_options(**WRITE_TRANSACTION) as conn, conn.begin():
            conn.execute(text("SELECT 1"))  # no write yet: the lock comes from BEGIN IMMEDIATE
            with waiter.connect() as other:
                assert other.execute(text("SELECT 1")).scalar() == 1  # readers still read
            with (
                pytest.raises(OperationalError, match="locked"),
                waiter.connect().execution_options(**WRITE_TRANSACTION) as other,
                other.begin(),
            ):
                pass
        with waiter.connect().execution_options(**WRITE_TRANSACTION) as other, other.begin():
            pass  # free again after commit
    finally:
        holder.dispose()
        waiter.dispose()
