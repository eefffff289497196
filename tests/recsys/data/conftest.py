"""Tiny raw datasets written into tmp folders, for the loaders' error-path tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

RECBOLE_ITEMS = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tShawshank Redemption, The\t1994\tDrama\n"
    "3\tMisérables, Les\t1995\tDrama War\n"
)
RECBOLE_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "10\t1\t5\t881250949\n"
    "10\t2\t4\t881250950\n"
    "11\t3\t3\t881250951\n"
    "11\t1\t2\t881250952\n"
)
EXTRAINFOS = (
    "1::Toy Story::1995::G::22 Nov 1995::Animation::John Lasseter::W::Tom Hanks, Tim Allen::Toys come to life.::http://x\r\n"
    "318::The Shawshank Redemption::1994::R::14 Oct 1994::Drama::Frank Darabont::W::Tim Robbins::Two imprisoned men bond.::N/A\r\n"
    "73::Les Misérables::1995::R::1995::Drama::Claude Lelouch::W::Jean-Paul Belmondo::N/A::N/A\r\n"
)


def _genre_flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(19))


# latin-1 on purpose, as GroupLens ships it ("Misérables" has a 0xE9 byte)
GROUPLENS_ITEMS = (
    f"1|Toy Story (1995)|01-Jan-1995||http://imdb/1|{_genre_flags(3, 4, 5)}\n"
    f"2|Shawshank Redemption, The (1994)|01-Jan-1994||http://imdb/2|{_genre_flags(8)}\n"
    f"3|Misérables, Les (1995)|01-Jan-1995||http://imdb/3|{_genre_flags(8, 17)}\n"
    f"4|unknown||||{_genre_flags(0)}\n"
)
GROUPLENS_DATA = (
    "10\t1\t5\t881250949\n10\t2\t4\t881250950\n11\t3\t3\t881250951\n11\t4\t2\t881250952\n"
)


@pytest.fixture
def make_recbole(tmp_path: Path) -> Callable[..., Path]:
    """Write ``ml-100k/`` (RecBole files) and ``ml-1m-meta/`` under tmp; return the ml-100k folder."""

    def make(
        items: str = RECBOLE_ITEMS, inter: str = RECBOLE_INTER, extrainfos: str | None = EXTRAINFOS
    ) -> Path:
        folder = tmp_path / "raw" / "ml-100k"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ml-100k.item").write_text(items, encoding="utf-8")
        (folder / "ml-100k.inter").write_text(inter, encoding="utf-8")
        if extrainfos is not None:
            meta = tmp_path / "raw" / "ml-1m-meta"
            meta.mkdir(exist_ok=True)
            (meta / "movies_extrainfos.dat").write_bytes(extrainfos.encode("utf-8"))
        return folder

    return make


@pytest.fixture
def make_grouplens(tmp_path: Path) -> Callable[..., Path]:
    """Write a GroupLens-layout ``ml-100k/`` (u.data, u.item in latin-1) under tmp."""

    def make(root: Path | None = None) -> Path:
        folder = (root or tmp_path / "gl") / "ml-100k"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "u.item").write_bytes(GROUPLENS_ITEMS.encode("latin-1"))
        (folder / "u.data").write_text(GROUPLENS_DATA, encoding="ascii")
        return folder

    return make


def _assert_names(exc: BaseException, filename: str, line: int | None, *fragments: str) -> None:
    msg = str(exc)
    assert filename in msg, msg
    if line is not None:
        assert f"line {line}:" in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg


@pytest.fixture
def assert_names() -> Callable[..., None]:
    """``assert_names(exc, filename, line, *fragments)``: the message names the file, the
    line (when not None) and the problem."""
    return _assert_names
