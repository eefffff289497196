"""Fixtures for the prototype store tests: every store test runs on SQLite and PostgreSQL.

* ``db_url``: URL of an *empty* database, parametrised ``sqlite`` (a temporary file) and
  ``postgresql`` (a fresh database created on the test server, dropped afterwards).
* ``store``: a :class:`PrototypeStore` on ``db_url`` after ``upgrade`` (the migrations,
  never ``create_all``).
* ``postgres_server``: the server's URL, from ``$RECSYS_TEST_POSTGRES_URL`` if set (CI
  exports it after ``scripts/start_test_postgres.sh``); otherwise the session starts a
  server with that script when PostgreSQL's binaries are installed (and stops it at the
  end if it was not running before); otherwise the PostgreSQL cases are skipped.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from codebook.store import PrototypeStore
from recsys import settings

ROOT = Path(__file__).resolve().parents[3]
START_SCRIPT = ROOT / "scripts" / "start_test_postgres.sh"


def _have_postgres_binaries() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or shutil.which("pg_ctl") is not None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a PostgreSQL server whose user may CREATE DATABASE."""
    url = settings.postgres_test_url()
    if url:
        yield url
        return
    if not _have_postgres_binaries():
        pytest.skip(
            "PostgreSQL is not available: set RECSYS_TEST_POSTGRES_URL, or install the "
            "server (apt-get install -y postgresql) so scripts/start_test_postgres.sh can "
            "start one"
        )
    was_running = (
        subprocess.run(
            ["bash", str(START_SCRIPT), "status"], capture_output=True, check=False
        ).returncode
        == 0
    )
    started = subprocess.run(
        ["bash", str(START_SCRIPT), "start"], capture_output=True, text=True, timeout=180
    )
    if started.returncode != 0 or not started.stdout.strip():
        pytest.fail(f"{START_SCRIPT} failed:\n{started.stderr[-2000:]}")
    yield started.stdout.strip().splitlines()[-1]
    if not was_running:
        subprocess.run(["bash", str(START_SCRIPT), "stop"], capture_output=True, check=False)


@pytest.fixture
def pg_database(postgres_server: str) -> Iterator[str]:
    """URL of a new, empty database on the test server (dropped after the test)."""
    server = make_url(postgres_server)
    name = f"recsys_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    return request.getfixturevalue("pg_database")


@pytest.fixture
def store(db_url: str) -> Iterator[PrototypeStore]:
    """A migrated store on ``db_url``."""
    s = PrototypeStore.open(db_url, upgrade=True)
    try:
        yield s
    finally:
        s.close()
