"""Alembic migrations: an empty database upgraded to head has exactly the models' schema
(autogenerate finds no difference), on SQLite and PostgreSQL; the CLI drives them."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect

from codebook.store import PrototypeStore, SchemaOutOfDateError, migrate
from codebook.store.db import make_engine
from codebook.store.models import Base
from recsys.cli import main


def test_migration_on_empty_database_matches_the_models(db_url: str) -> None:
    assert migrate.current_revision(db_url) is None
    assert migrate.upgrade(db_url) == migrate.head_revision()
    assert migrate.schema_diff(db_url) == []
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert migrate.upgrade(db_url) == migrate.head_revision()  # idempotent


def test_downgrade_to_base_and_back(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            cfg = migrate.alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert migrate.current_revision(engine) is None
        migrate.upgrade(engine)
        assert migrate.schema_diff(engine) == []
    finally:
        engine.dispose()


def test_store_refuses_an_unmigrated_database(db_url: str) -> None:
    with pytest.raises(SchemaOutOfDateError, match="recsys db upgrade"):
        PrototypeStore.open(db_url)
    with PrototypeStore.open(db_url, upgrade=True) as store:
        assert store.list_prototypes() == []
    PrototypeStore.open(db_url).close()  # now current


def test_cli_upgrade_and_current(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "current", "--url", db_url]) == 1
    assert "(empty database)" in capsys.readouterr().out
    assert main(["db", "upgrade", "--url", db_url]) == 0
    assert f"to {migrate.head_revision()}" in capsys.readouterr().out
    assert main(["db", "upgrade", "--url", db_url]) == 0
    assert "already at revision" in capsys.readouterr().out
    assert main(["db", "current", "--url", db_url]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_rejects_unsupported_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "current", "--url", "mysql://u@h/db"]) == 2
    assert "unsupported database" in capsys.readouterr().err


def test_migrations_ship_inside_the_package() -> None:
    assert (migrate.MIGRATIONS_DIR / "env.py").is_file()
    assert (migrate.MIGRATIONS_DIR / "versions" / "__init__.py").is_file()
    assert migrate.MIGRATIONS_DIR.parent.name == "store"
    assert migrate.alembic_config().get_main_option("script_location") == str(
        migrate.MIGRATIONS_DIR
    )
