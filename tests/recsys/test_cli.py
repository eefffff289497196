"""The CLI shell: help, unknown commands, and the mapping of domain errors to exit codes."""

from __future__ import annotations

import re

import pytest

from recsys.cli import main


def test_help_lists_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "data" in out


def _listed(help_text: str) -> list[str]:
    """The command names of a --help page (lines "    NAME   help ...")."""
    return re.findall(r"^    (\S+)", help_text, flags=re.MULTILINE)


def test_help_lists_only_groups_with_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import recsys.cli

    monkeypatch.setattr(recsys.cli, "COMMAND_MODULES", ("recsys.cli.data_cmd",))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert _listed(capsys.readouterr().out) == ["data"]
    with pytest.raises(SystemExit) as exc:
        main(["train"])  # no module filled it: not a command at all
    assert exc.value.code == 2


def test_every_listed_group_has_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import GROUPS

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = [c for c in _listed(capsys.readouterr().out) if c in GROUPS]
    assert "data" in listed and "train" in listed
    for group in listed:
        assert main([group]) == 2  # a group alone prints its own help with its commands
        assert "SUBCOMMAND" in capsys.readouterr().out


def test_unknown_group_is_a_programming_error() -> None:
    import argparse

    from recsys.cli import CommandGroups

    groups = CommandGroups(argparse.ArgumentParser())
    with pytest.raises(KeyError, match=r"recsys\.cli\.GROUPS"):
        groups["no-such-group"]


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

    from recsys.reporting import write_json

    path = tmp_path / "out.json"
    write_json(path, {"nan": float("nan"), "arr": np.array([1.0, np.inf]), "f32": np.float32(2.5)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert data["nan"] is None and data["arr"] == [1.0, None] and data["f32"] == 2.5
    assert "versions" in data


def test_serve_cloud_refine_flags_default_to_the_refine_config() -> None:
    from codebook.refine import RefineConfig
    from recsys.cli import build_parser

    args = build_parser().parse_args(["serve", "cloud", "--refine"])
    cfg = RefineConfig()
    assert (args.refine_steps, args.refine_lr, args.refine_positions) == (
        cfg.steps,
        cfg.lr,
        cfg.positions,
    )
