"""The package dependency direction of docs/architecture.md, enforced with import-linter.

The contracts live in pyproject.toml ([tool.importlinter]). Further tests run the same
machinery on contracts that the code is known to break (a forbidden import, an inverted
layer order), so a silently passing linter (misconfigured root packages, nothing
analysed) would be caught, and check that every module of ``recsys`` is either in the
core list of the contracts or in the application layer, so a new module cannot slip
past them.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = {"recsys.cli", "recsys.abtest", "recsys.replay", "recsys.workflows"}


@pytest.fixture(autouse=True)
def keep_loggers_enabled():
    """import-linter configures logging with ``disable_existing_loggers``, which silences
    every logger made before it (grpc's, the services'): later tests that read log
    records (caplog) would then see none. Put the loggers back as they were."""
    loggers = [x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger)]
    before = {logger: logger.disabled for logger in loggers}
    yield
    for logger in logging.root.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            logger.disabled = before.get(logger, False)


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_package_dependency_direction_holds() -> None:
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def _lint(tmp_path: Path, body: str) -> int:
    config = tmp_path / "violated.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["recsys"]\n' + body)
    return lint_imports(config_filename=str(config), no_cache=True)


def test_a_known_forbidden_import_is_detected(tmp_path: Path) -> None:
    # recsys.cli imports recsys.errors by design, so forbidding it must fail.
    body = (
        "[[tool.importlinter.contracts]]\n"
        'name = "deliberately violated"\n'
        'type = "forbidden"\n'
        'source_modules = ["recsys.cli"]\n'
        'forbidden_modules = ["recsys.errors"]\n'
    )
    assert _lint(tmp_path, body) == 1


def test_an_inverted_layer_order_is_detected(tmp_path: Path) -> None:
    # the CLI imports the replay, so putting the replay above the CLI must fail
    body = (
        "[[tool.importlinter.contracts]]\n"
        'name = "deliberately inverted"\n'
        'type = "layers"\n'
        'layers = ["recsys.replay", "recsys.cli"]\n'
    )
    assert _lint(tmp_path, body) == 1


def test_reaching_into_a_protected_package_is_detected(tmp_path: Path) -> None:
    # the CLI imports replay modules directly, so protecting them from it must fail
    body = (
        "[[tool.importlinter.contracts]]\n"
        'name = "deliberately violated"\n'
        'type = "protected"\n'
        'protected_modules = ["recsys.replay.**"]\n'
        'allowed_importers = ["recsys.replay"]\n'
    )
    assert _lint(tmp_path, body) == 1


@pytest.mark.parametrize(
    "name",
    [
        "recsys core depends on no other project package",
        "nothing below the application layer imports it",
    ],
)
def test_every_recsys_module_is_core_or_application(name: str) -> None:
    listed = next(c for c in contracts() if c["name"] == name)["source_modules"]
    core = {m for m in listed if m.startswith("recsys.")}
    found = {
        f"recsys.{p.stem}"
        for p in (ROOT / "recsys").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert found - APPLICATION == core, "list each new recsys module in the contracts"
