"""`recsys data prepare|info|fetch` through the CLI entry point main(argv)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

import recsys.cli
from recsys.cli import data_cmd
from recsys.data.fetch import ARCHIVES
from recsys.data.registry import DATASETS, prepared_path


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch):
    """``recsys.cli.main`` with only the data commands registered, so these tests do not
    depend on the other command modules (tests/recsys/test_cli.py covers the full set)."""
    monkeypatch.setattr(recsys.cli, "COMMAND_MODULES", ("recsys.cli.data_cmd",))
    return recsys.cli.main


def test_help_names_match_the_registry() -> None:
    assert set(data_cmd.DATASET_NAMES) == set(DATASETS)
    assert set(data_cmd.FETCHABLE) == set(ARCHIVES)


def test_info_on_real_ml100k(main, ml100k, session_cache: Path, tmp_path: Path, capsys) -> None:
    path = prepared_path("ml-100k", session_cache)  # prepared once by the ml100k fixture
    out_json = tmp_path / "info.json"
    assert main(["data", "info", str(path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "users          943" in out
    assert "1,682" in out and "100,000" in out
    assert "1997-09-20" in out and "1998-04-22" in out
    assert "ml-1m join:" in out and "items matched" in out
    figures = json.loads(out_json.read_text())
    assert (figures["users"], figures["items"], figures["interactions"]) == (943, 1682, 100_000)
    assert figures["time_range"]["first"].startswith("1997-09-20")
    assert figures["ratings"]["distribution"]["4"] == 34_174
    assert figures["interactions_per_user"]["min"] == 20
    assert figures["text_coverage"]["title"] > 0.99
    assert figures["ml1m_join"]["rate"] == ml100k.info["ml1m_join"]["rate"]
    assert "versions" in figures


def test_info_by_name_uses_the_cache(
    main, ml100k, raw_data_dir: Path, session_cache: Path, capsys
) -> None:
    argv = [
        "data",
        "info",
        "ml-100k",
        "--data-dir",
        str(raw_data_dir),
        "--cache-dir",
        str(session_cache),
    ]
    assert main(argv) == 0
    assert "users          943" in capsys.readouterr().out


def test_info_on_malformed_input_exits_2(main, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "items.jsonl").write_text('{"item_id": "a"}\n{"item_id": "b"}\n')
    (bad / "interactions.csv").write_text("user_id,item_id,timestamp\nu,a,1\nu,b,soon\n")
    assert main(["data", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "interactions.csv, line 3: timestamp 'soon' is not an integer" in err


def test_prepare_unknown_name_exits_2(main, tmp_path: Path, capsys) -> None:
    assert main(["data", "prepare", "ml-20m", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'ml-20m'" in err and "amazon-scientific" in err


def _grouplens_zip(path: Path) -> Path:
    """A tiny zip laid out like the official ml-100k.zip (u.item is latin-1)."""
    flags = "|".join(["0"] * 8 + ["1"] + ["0"] * 10)  # Drama
    items = "".join(
        f"{i}|Film {i} (199{i})|01-Jan-199{i}||http://imdb/{i}|{flags}\n" for i in range(1, 5)
    )
    data = "10\t1\t5\t881250949\n10\t2\t4\t881250950\n11\t3\t3\t881250951\n11\t4\t2\t881250952\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.item", items.encode("latin-1"))
        zf.writestr("ml-100k/u.data", data)
    return path


def test_prepare_and_fetch(main, tmp_path: Path, capsys) -> None:
    archive = _grouplens_zip(tmp_path / "ml-100k.zip")
    cache = tmp_path / "cache"
    fetch = ["data", "fetch", "ml-100k", "--url", archive.as_uri(), "--cache-dir", str(cache)]
    assert main(fetch) == 2  # a made-up archive is not the official one
    assert "not the official ml-100k.zip" in capsys.readouterr().err
    assert main([*fetch, "--no-verify"]) == 0
    assert (cache / "raw" / "ml-100k" / "u.data").is_file()
    argv = [
        "data",
        "prepare",
        "ml-100k",
        "--data-dir",
        str(tmp_path / "none"),
        "--cache-dir",
        str(cache),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 users, 4 items, 4 interactions" in out
    assert (cache / "datasets" / "ml-100k" / "items.jsonl").is_file()
    assert main([*argv, "--force"]) == 0


def test_fetch_failure_exits_2(main, tmp_path: Path, capsys) -> None:
    url = (tmp_path / "nothing.zip").as_uri()
    assert (
        main(["data", "fetch", "ml-100k", "--url", url, "--data-dir", str(tmp_path / "raw")]) == 2
    )
    assert "download it manually" in capsys.readouterr().err.lower()
