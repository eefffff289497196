"""MovieLens 100K: real data facts, both source layouts, the ml-1m join, malformed input."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from recsys.data.canonical import Dataset
from recsys.data.movielens import load_ml100k, normalise_title, series_keys, title_keys
from recsys.errors import DataFormatError, DatasetNotFoundError

RECBOLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"

# ---- real data (prepared once per session by tests/conftest.py) ------------------------------


def test_real_counts_and_time_range(ml100k: Dataset) -> None:
    assert (ml100k.num_users, ml100k.num_items, len(ml100k.interactions)) == (943, 1682, 100_000)
    first = datetime.fromtimestamp(int(ml100k.timestamps.min()), tz=UTC)
    last = datetime.fromtimestamp(int(ml100k.timestamps.max()), tz=UTC)
    assert (ml100k.timestamps.min(), ml100k.timestamps.max()) == (874724710, 893286638)
    assert first.date().isoformat() == "1997-09-20"
    assert last.date().isoformat() == "1998-04-22"
    assert sorted(ml100k.interactions["rating"].unique()) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_real_join_is_reported_and_good(ml100k: Dataset) -> None:
    report = ml100k.info["ml1m_join"]
    assert report["total"] == 1682
    assert report["rate"] == pytest.approx(report["matched"] / 1682, abs=1e-4)
    assert report["rate"] >= 0.98  # measured: 1667 / 1682 = 0.991
    assert report["interactions_covered"] >= 0.99
    assert report["ambiguous"] == 0
    assert len(report["unmatched"]) == 1682 - report["matched"]
    items = ml100k.items.set_index("item_id")
    # article moved ("Shawshank Redemption, The"), series rule ("Star Wars"), accents folded
    assert "Darabont" in items.at["64", "director"]
    assert "Mark Hamill" in items.at["50", "actors"]
    assert "Lightyear" in items.at["1", "plot"]
    assert items.at["1", "title"] == "Toy Story"
    assert items.at["1", "genres"] == "Animation, Children's, Comedy"
    assert int(items.at["1", "year"]) == 1995


# ---- title normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Shawshank Redemption, The", "The Shawshank Redemption"),
        ("Misérables, Les", "Les Miserables"),
        ("Godfather: Part II, The", "The Godfather: Part II"),
        ("Associé, L'", "L'associé"),
        ("Alien 3", "Alien³"),
        ("Oscar & Lucinda", "Oscar and Lucinda"),
    ],
)
def test_normalise_title_matches_variants(a: str, b: str) -> None:
    assert normalise_title(a) == normalise_title(b)


def test_normalise_title_keeps_different_articles_apart() -> None:
    # "Boys, Les" (1997) and "Boys, The" (1997) are different films in ml-1m
    assert normalise_title("Boys, Les") != normalise_title("The Boys")


def test_title_keys_and_series_keys() -> None:
    assert title_keys("Caro Diario (Dear Diary) (1994)") == {"carodiario", "deardiary"}
    assert series_keys("Star Wars: Episode V - The Empire Strikes Back") == {
        "starwars",
        "theempirestrikesback",
    }
    assert series_keys("Toy Story") == set()


# ---- the two layouts on tiny files -----------------------------------------------------------


def test_recbole_layout_with_join(make_recbole: Callable[..., Path]) -> None:
    ds = load_ml100k(make_recbole())
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 3, 4)
    report = ds.info["ml1m_join"]
    assert (report["matched"], report["total"], report["rate"]) == (3, 3, 1.0)
    items = ds.items.set_index("item_id")
    assert items.at["2", "plot"] == "Two imprisoned men bond."
    assert pd.isna(items.at["3", "plot"])  # "N/A" in the source
    assert items.at["3", "director"] == "Claude Lelouch"


def test_join_skipped_without_meta(make_recbole: Callable[..., Path]) -> None:
    ds = load_ml100k(make_recbole(extrainfos=None))
    assert "skipped" in ds.info["ml1m_join"]["status"]
    assert "plot" not in ds.items.columns


def test_grouplens_layout(make_grouplens: Callable[..., Path]) -> None:
    ds = load_ml100k(make_grouplens())
    assert ds.info["layout"] == "grouplens"
    items = ds.items.set_index("item_id")
    assert items.at["3", "title"] == "Misérables, Les"  # latin-1 decoded
    assert items.at["3", "year"] == 1995
    assert items.at["3", "genres"] == "Drama, War"
    assert items.at["1", "genres"] == "Animation, Children's, Comedy"
    assert pd.isna(items.at["4", "title"]) and pd.isna(items.at["4", "year"])
    assert ds.timestamps.tolist() == [881250949, 881250950, 881250951, 881250952]


def test_no_known_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"u\.data"):
        load_ml100k(tmp_path)


# ---- malformed input: each names file + line + problem -------------------------------------


def test_missing_column(make_recbole: Callable[..., Path], assert_names) -> None:
    inter = "user_id:token\titem_id:token\trating:float\n10\t1\t5\n"
    with pytest.raises(DataFormatError) as exc:
        load_ml100k(make_recbole(inter=inter))
    assert_names(exc.value, "ml-100k.inter", 1, "missing column(s) timestamp")


def test_unknown_item_id(make_recbole: Callable[..., Path], assert_names) -> None:
    inter = RECBOLE_HEADER + "10\t1\t5\t881250949\n10\t99\t4\t881250950\n"
    with pytest.raises(DataFormatError) as exc:
        load_ml100k(make_recbole(inter=inter))
    assert_names(exc.value, "ml-100k.inter", 3, "unknown item_id '99'", "ml-100k.item")


def test_non_numeric_timestamp(make_recbole: Callable[..., Path], assert_names) -> None:
    inter = RECBOLE_HEADER + "10\t1\t5\t881250949\n10\t2\t4\t881250950\n11\t3\t3\tlater\n"
    with pytest.raises(DataFormatError) as exc:
        load_ml100k(make_recbole(inter=inter))
    assert_names(exc.value, "ml-100k.inter", 4, "timestamp 'later' is not an integer")


def test_duplicate_item_id(make_recbole: Callable[..., Path], assert_names) -> None:
    items = (
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tA\t1995\tDrama\n2\tB\t1995\tDrama\n1\tC\t1996\tDrama\n"
    )
    with pytest.raises(DataFormatError) as exc:
        load_ml100k(make_recbole(items=items))
    assert_names(exc.value, "ml-100k.item", 4, "duplicate item_id '1'")


def test_wrong_field_count(make_recbole: Callable[..., Path], assert_names) -> None:
    inter = RECBOLE_HEADER + "10\t1\t5\t881250949\n10\t2\t4\t881250950\textra\n"
    with pytest.raises(DataFormatError) as exc:
        load_ml100k(make_recbole(inter=inter))
    assert_names(exc.value, "ml-100k.inter", 3, "wrong number of fields")


def test_malformed_extrainfos(make_recbole: Callable[..., Path], assert_names) -> None:
    bad = "1::Toy Story::1995::G\r\n"
    with pytest.raises(DataFormatError) as exc:
        load_ml100k(make_recbole(extrainfos=bad))
    assert_names(
        exc.value, "movies_extrainfos.dat", 1, "expected 11 '::'-separated fields, found 4"
    )


def test_blank_line_keeps_line_numbers(make_recbole: Callable[..., Path], assert_names) -> None:
    inter = RECBOLE_HEADER + "10\t1\t5\t881250949\n\n10\t99\t4\t881250950\n\n"
    with pytest.raises(DataFormatError) as exc:
        load_ml100k(make_recbole(inter=inter))
    assert_names(exc.value, "ml-100k.inter", 3, "empty user_id")
