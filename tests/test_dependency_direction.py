"""The package dependency direction of DESIGN.md section 2, enforced with import-linter.

The contracts live in pyproject.toml ([tool.importlinter]). A second test runs the same
machinery on a contract that the code is known to break, so a silently passing linter
(misconfigured root packages, nothing analysed) would be caught.
"""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_package_dependency_direction_holds() -> None:
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_a_known_violation_is_detected(tmp_path: Path) -> None:
    # recsys.cli imports recsys.errors by design, so forbidding it must fail.
    config = tmp_path / "violated.toml"
    config.write_text(
        "[tool.importlinter]\n"
        'root_packages = ["recsys"]\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "deliberately violated"\n'
        'type = "forbidden"\n'
        'source_modules = ["recsys.cli"]\n'
        'forbidden_modules = ["recsys.errors"]\n'
    )
    assert lint_imports(config_filename=str(config), no_cache=True) == 1
