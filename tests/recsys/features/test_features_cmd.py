"""``recsys features build|show`` on small canonical dataset directories."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from recsys.cli import features_cmd
from recsys.data.canonical import write_dataset
from recsys.features import ItemFeatures
from recsys.features import text as text_mod


def _run(argv: list[str]) -> int:
    """Parse with only the features group registered (other helpers' modules may be absent)."""
    parser = argparse.ArgumentParser(prog="recsys")
    top = parser.add_subparsers(dest="command")
    groups = {"features": top.add_parser("features").add_subparsers(dest="subcommand")}
    features_cmd.register(groups)
    args = parser.parse_args(argv)
    return args.handler(args)


def test_build_and_show_tiktok_like(tiktok_like, tmp_path: Path, capsys) -> None:
    data = write_dataset(tiktok_like, tmp_path / "tiktok-mini")
    out_json = tmp_path / "summary.json"
    code = _run(
        ["features", "build", str(data), "--weight", "audio=0.5", "--cache-dir", str(tmp_path / "c"),
         "--json", str(out_json)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| modality" in printed and "| image" in printed and "| fused" in printed
    feats = ItemFeatures.load(data)  # saved beside the dataset given by path
    assert feats.weights == {"image": 1.0, "audio": 0.5}
    payload = json.loads(out_json.read_text())
    # read_dataset loads features/*.npy in name order, which sets the block order
    assert [r["modality"] for r in payload["summary"]] == ["audio", "image", "fused"]
    assert payload["layout"] == {"audio": [0, 6], "image": [6, 22]}
    assert _run(["features", "show", str(data)]) == 0
    assert "| audio" in capsys.readouterr().out


def test_build_text_dataset_uses_the_cache(
    movie_dataset, fake_encoder, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(text_mod, "MiniLMEncoder", lambda **_: fake_encoder)
    data = write_dataset(movie_dataset, tmp_path / "movies")
    argv = ["features", "build", str(data), "--cache-dir", str(tmp_path / "c"), "--no-progress",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert _run(argv) == 0
    assert "0 from cache, 3 encoded, 1 without text" in capsys.readouterr().out
    assert _run(argv) == 0
    assert "3 from cache, 0 encoded, 1 without text" in capsys.readouterr().out
    assert ItemFeatures.load(tmp_path / "out").layout == {"text": (0, 8)}


def test_bad_weight_is_a_validation_error(tiktok_like, tmp_path: Path) -> None:
    from recsys.errors import ValidationError

    data = write_dataset(tiktok_like, tmp_path / "t")
    with pytest.raises(ValidationError, match="MODALITY=NUMBER"):
        _run(["features", "build", str(data), "--weight", "audio"])
    with pytest.raises(ValidationError, match="not available"):
        _run(["features", "build", str(data), "--modalities", "text"])
    assert np.load(data / "features" / "image.npy").shape == (12, 16)
