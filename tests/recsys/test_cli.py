"""The CLI shell: help, unknown commands, and the mapping of domain errors to exit codes."""

from __future__ import annotations

import pytest

from recsys.cli import main


def test_help_lists_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "data" in out


def test_group_without_subcommand_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data"]) == 2
    assert "prepare" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_json_output_is_strict_json_without_nan(tmp_path) -> None:
    import json

    import numpy as np

    from recsys.cli.common import write_json

    path = tmp_path / "out.json"
    write_json(path, {"nan": float("nan"), "arr": np.array([1.0, np.inf]), "f32": np.float32(2.5)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert data["nan"] is None and data["arr"] == [1.0, None] and data["f32"] == 2.5
    assert "versions" in data
