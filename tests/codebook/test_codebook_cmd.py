"""``recsys train codebook`` through the real CLI entry point, on a tiny canonical dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from codebook import Codebook, SemanticIdMap
from recsys.cli import main


def test_train_codebook_rqkmeans(tiny_dataset_dir: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "cb", tmp_path / "report.json"
    argv = ["train", "codebook", "--dataset", str(tiny_dataset_dir), "--method", "rqkmeans",
            "--codes", "8", "--seed", "1", "--out", str(out), "--json", str(report),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rqkmeans codebook of tiny: 60 items x 12 dims (image 12), L=3, K=8" in printed
    assert re.search(r"\| level +\| kind", printed)  # a Markdown table (column widths vary)
    assert re.search(r"\| d +\| disambiguation", printed)
    assert "final_unique" in printed and "| yes" in printed
    payload = json.loads(report.read_text())
    assert payload["report"]["summary"]["final_unique"] is True
    assert payload["config"]["method"] == "rqkmeans" and payload["config"]["codes"] == 8
    assert [row["level"] for row in payload["report"]["levels"]] == ["a", "b", "c", "d"]
    cb = Codebook.load(out)
    assert cb.ids.num_items == 60 and cb.info["dataset"] == "tiny"
    assert cb.info["feature_layout"] == {"image": [0, 12]}
    assert cb.ids.item_ids[0] == "i0"


def test_train_codebook_rqvae_with_collaborative(
    tiny_dataset_dir: Path, tmp_path: Path, capsys
) -> None:
    collab = tmp_path / "collab.npy"
    np.save(collab, np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32))
    out = tmp_path / "cb"
    argv = ["train", "codebook", "--dataset", str(tiny_dataset_dir), "--levels", "2",
            "--epochs", "5", "--collaborative", str(collab), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rqvae codebook of tiny" in printed and "(image 12, collaborative 4)" in printed
    ids = SemanticIdMap.load(out)
    assert ids.num_levels == 3 and ids.vocab_sizes[0] == 16  # default K for 60 items
    assert len(np.unique(ids.codes, axis=0)) == 60


def test_default_output_dir_and_bad_input(tiny_dataset_dir: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    base = ["train", "codebook", "--dataset", str(tiny_dataset_dir), "--method", "rqkmeans",
            "--cache-dir", str(cache), "--no-progress"]  # fmt: skip
    assert main(base) == 0
    assert (cache / "artifacts" / "tiny" / "codebook" / "codebook.json").is_file()
    capsys.readouterr()
    assert main([*base, "--codes", "500"]) == 2
    assert "exceeds the 60 items" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((7, 3), dtype=np.float32))
    assert main([*base, "--collaborative", str(bad)]) == 2
    assert "collaborative" in capsys.readouterr().err
