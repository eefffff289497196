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
