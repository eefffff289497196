"""MovieLens 100K loader, with plot / director / actors joined from the ml-1m metadata.

Two source layouts are accepted in the ``ml-100k/`` folder:

* RecBole atomic files (what ``../shared/data`` holds): ``ml-100k.inter`` (tab-separated,
  header ``user_id:token item_id:token rating:float timestamp:float``) and ``ml-100k.item``
  (``item_id``, ``movie_title``, ``release_year``, ``class`` = space-separated genres).
* The original GroupLens archive (what ``recsys data fetch ml-100k`` downloads):
  ``u.data`` (tab-separated user, item, rating, unix time; no header) and ``u.item``
  (pipe-separated, latin-1; id, "Title (Year)", release date, video date, IMDb URL and
  19 genre flags).

Both give the same canonical dataset: 943 users, 1682 items, 100,000 ratings with unix
timestamps (1997-09-20 .. 1998-04-22). Item text columns: ``title`` (year stripped),
``year``, ``genres`` (comma-separated), and where the ml-1m join matches, ``plot``,
``director``, ``actors``.

The ml-1m join (:func:`join_ml1m_meta`): MovieLens 1M ids differ from 100K ids, so items
are matched by normalised title + year. Each side contributes several title keys (the
main title and every parenthesised alternative title, e.g. "Caro Diario (Dear Diary)"),
normalised by folding accents, moving a trailing article to the front ("Shawshank
Redemption, The" -> "the shawshank redemption"), "&" -> "and", dropping punctuation,
spaces and case. The ml-1m side takes keys from both ``movies_extrainfos.dat`` (OMDb
titles) and ``movies.dat`` (MovieLens-style titles, same ids), which raises the match
rate from about 94 % to 98 %. Rules, tried in order, each accepting only a *unique*
candidate (ambiguous keys are left unmatched rather than guessed):

1. ``exact``: a shared key and the same year;
2. ``year+-1``: a shared key and a year one off (release vs production year, e.g.
   "Howling, The" 1981 vs 1980);
3. ``series``: the ml-1m title before ":" or its episode subtitle equals the whole
   ml-100k title, same year ("Star Wars" 1977 -> "Star Wars: Episode IV - A New Hope",
   "Empire Strikes Back, The" 1980 -> "Star Wars: Episode V - The Empire Strikes Back").

The report (matched, total, rate, per rule, interactions covered, unmatched titles) is
stored in ``Dataset.info["ml1m_join"]`` and logged.
"""

from __future__ import annotations

import csv
import logging
import re
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.data.canonical import Dataset, parse_timestamps
from recsys.errors import DataFormatError, DatasetNotFoundError

logger = logging.getLogger(__name__)

NAME = "ml-100k"
#: GroupLens u.item genre flag columns, in file order (u.genre).
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
#: movies_extrainfos.dat fields, split on "::".
EXTRAINFO_FIELDS = (
    "ml1m_id", "title", "year", "rated", "released", "genres", "director", "writers",
    "actors", "plot", "poster",
)  # fmt: skip
META_TEXT_COLUMNS = ("plot", "director", "actors")
_MISSING_TITLES = {"unknown", "unkonwn"}  # placeholder title of item 267 (sic in RecBole)


# ---- reading the ml-100k layouts ----------------------------------------------------------
def read_delimited(
    path: Path, sep: str, *, header: bool, names: list[str] | None = None, encoding: str = "utf-8"
) -> pd.DataFrame:
    """Read a delimited text file as strings; a malformed line -> :class:`DataFormatError`.

    With ``header`` the RecBole ``name:type`` header is reduced to ``name``. Missing
    trailing fields come back as empty strings (checked by the callers).
    """
    try:
        table = pd.read_csv(
            path,
            sep=sep,
            header=0 if header else None,
            names=names,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            quoting=csv.QUOTE_NONE,
            encoding=encoding,
            index_col=False,
            skip_blank_lines=False,  # keep row i == line i + offset; blank rows are reported
        )
    except pd.errors.ParserError as exc:
        found = re.search(r"line (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        raise DataFormatError(path, line, f"wrong number of fields ({exc})") from None
    except pd.errors.EmptyDataError:
        raise DataFormatError(path, None, "the file is empty") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, f"not {encoding} text ({exc.reason})") from None
    if header:
        table.columns = [str(c).split(":", 1)[0].strip() for c in table.columns]
    filled = (table != "").any(axis=1).to_numpy()
    last = int(np.flatnonzero(filled)[-1]) + 1 if filled.any() else 0
    return table.iloc[:last]  # drop blank lines at the end of the file only


def _require_columns(table: pd.DataFrame, path: Path, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataFormatError(
            path,
            1,
            f"missing column(s) {', '.join(missing)} in the header (found {', '.join(map(str, table.columns))})",
        )


def _first_bad(mask: np.ndarray | pd.Series) -> int | None:
    hits = np.flatnonzero(np.asarray(mask))
    return int(hits[0]) if len(hits) else None


def _build_interactions(
    raw: pd.DataFrame, path: Path, known_items: pd.Index, line_offset: int, items_file: str
) -> pd.DataFrame:
    """Columns user_id, item_id, rating, timestamp (strings) -> typed canonical frame."""
    for col in ("user_id", "item_id"):
        row = _first_bad(raw[col].str.len() == 0)
        if row is not None:
            raise DataFormatError(path, row + line_offset, f"empty {col}")
    row = _first_bad(known_items.get_indexer(raw["item_id"]) < 0)
    if row is not None:
        raise DataFormatError(
            path,
            row + line_offset,
            f"unknown item_id {raw['item_id'].iloc[row]!r} (not in {items_file})",
        )
    rating = pd.to_numeric(raw["rating"], errors="coerce")
    row = _first_bad(rating.isna())
    if row is not None:
        raise DataFormatError(
            path, row + line_offset, f"rating {raw['rating'].iloc[row]!r} is not a number"
        )
    return pd.DataFrame(
        {
            "user_id": raw["user_id"].to_numpy(),
            "item_id": raw["item_id"].to_numpy(),
            "timestamp": parse_timestamps(raw["timestamp"], path, line_offset),
            "rating": rating.to_numpy(dtype=np.float64),
        }
    )


def _check_unique_ids(items: pd.DataFrame, path: Path, line_offset: int) -> None:
    row = _first_bad(items["item_id"].str.len() == 0)
    if row is not None:
        raise DataFormatError(path, row + line_offset, "empty item_id")
    row = _first_bad(items["item_id"].duplicated())
    if row is not None:
        raise DataFormatError(
            path,
            row + line_offset,
            f"duplicate item_id {items['item_id'].iloc[row]!r}; ids must be unique",
        )


def _split_year(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    """'Toy Story (1995)' -> ('Toy Story', '1995'); titles without a trailing year keep ''."""
    parts = titles.str.strip().str.extract(r"^(?P<title>.*?)\s*(?:\((?P<year>\d{4})\)\s*)?$")
    return parts["title"].fillna(""), parts["year"].fillna("")


def _finish_items(
    item_id: pd.Series, title: pd.Series, year: pd.Series, genres: pd.Series
) -> pd.DataFrame:
    """Common item columns: title (None for placeholders), year (int or None), genres."""
    clean_title = title.str.strip()
    titles = clean_title.to_numpy(dtype=object, copy=True)
    titles[(clean_title.str.lower().isin(_MISSING_TITLES) | (clean_title == "")).to_numpy()] = None
    genre_arr = genres.to_numpy(dtype=object, copy=True)
    genre_arr[(genres == "").to_numpy()] = None
    year_num = pd.to_numeric(year, errors="coerce")
    return pd.DataFrame(
        {
            "item_id": item_id.to_numpy(dtype=object),
            "title": titles,
            "year": np.array([None if np.isnan(y) else int(y) for y in year_num], dtype=object),
            "genres": genre_arr,
        }
    )


def read_recbole(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items and interactions from RecBole's ``ml-100k.item`` / ``ml-100k.inter``."""
    item_path, inter_path = folder / "ml-100k.item", folder / "ml-100k.inter"
    raw_items = read_delimited(item_path, "\t", header=True)
    _require_columns(raw_items, item_path, ("item_id", "movie_title", "release_year", "class"))
    _check_unique_ids(raw_items, item_path, line_offset=2)
    # one RecBole row has the year inside the title and "V" as year:
    # "Land Before Time III: ... (1995)" / "V" -> take the year from the title
    title, year_in_title = _split_year(raw_items["movie_title"])
    year = raw_items["release_year"].where(
        raw_items["release_year"].str.fullmatch(r"\d{4}"), year_in_title
    )
    genres = raw_items["class"].str.split().str.join(", ")
    genres = genres.where(genres != "unknown", "")
    items = _finish_items(raw_items["item_id"], title, year, genres)

    raw_inter = read_delimited(inter_path, "\t", header=True)
    _require_columns(raw_inter, inter_path, ("user_id", "item_id", "rating", "timestamp"))
    inter = _build_interactions(
        raw_inter, inter_path, pd.Index(items["item_id"]), 2, item_path.name
    )
    return items, inter


def read_grouplens(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items and interactions from the GroupLens ``u.item`` (latin-1) / ``u.data``."""
    item_path, inter_path = folder / "u.item", folder / "u.data"
    names = ["item_id", "title", "release_date", "video_date", "url", *GROUPLENS_GENRES]
    raw_items = read_delimited(item_path, "|", header=False, names=names, encoding="latin-1")
    _check_unique_ids(raw_items, item_path, line_offset=1)
    flags = raw_items[list(GROUPLENS_GENRES)]
    row = _first_bad(~flags.isin(["0", "1"]).all(axis=1))
    if row is not None:
        raise DataFormatError(
            item_path, row + 1, "expected 24 '|'-separated fields ending in 19 0/1 genre flags"
        )
    flag_matrix = flags.to_numpy() == "1"  # [I, 19]
    flag_matrix[:, 0] = False  # "unknown" is not a genre
    names_arr = np.array(GROUPLENS_GENRES, dtype=object)
    genres = pd.Series([", ".join(names_arr[r]) for r in flag_matrix], dtype=object)
    title, year = _split_year(raw_items["title"])
    date_year = raw_items["release_date"].str.extract(r"(\d{4})\s*$")[0].fillna("")
    year = year.where(year != "", date_year)
    items = _finish_items(raw_items["item_id"], title, year, genres)

    raw_inter = read_delimited(
        inter_path, "\t", header=False, names=["user_id", "item_id", "rating", "timestamp"]
    )
    inter = _build_interactions(
        raw_inter, inter_path, pd.Index(items["item_id"]), 1, item_path.name
    )
    return items, inter


# ---- title normalisation and the ml-1m join -----------------------------------------------
_ARTICLES = "the|a|an|les|la|le|l'|il|el|los|las|das|der|die|det|den|lo|o"
_TRAILING_ARTICLE = re.compile(rf",\s*({_ARTICLES})$")
_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*$")
_PAREN = re.compile(r"\(([^()]*)\)")
_EPISODE = re.compile(r"^.*?:\s*Episode\s+\w+\s+-\s+(.+)$")


def normalise_title(title: str) -> str:
    """A matching key: accents folded, trailing article moved to the front, alphanumerics only.

    Example::

        normalise_title("Shawshank Redemption, The") == normalise_title("The Shawshank Redemption")
        normalise_title("Misérables, Les") == "lesmiserables"
    """
    text = unicodedata.normalize("NFKD", title)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower().strip()
    found = _TRAILING_ARTICLE.search(text)
    if found:
        article = found.group(1)
        text = f"{article}{'' if article.endswith(chr(39)) else ' '}{text[: found.start()]}"
    text = text.replace("&", " and ")
    return re.sub(r"[^a-z0-9]", "", text)


def title_keys(title: str) -> set[str]:
    """Keys of a title: the main title and each parenthesised alternative title.

    "Seven (Se7en)" -> {"seven", "se7en"}; a trailing "(1995)" year is ignored.
    """
    title = _YEAR_SUFFIX.sub("", title.strip())
    keys = {normalise_title(_PAREN.sub("", title))}
    keys.update(normalise_title(alt) for alt in _PAREN.findall(title))
    return {k for k in keys if k}


def series_keys(title: str) -> set[str]:
    """Keys for the ``series`` rule: the part before ":" and an episode subtitle.

    "Star Wars: Episode V - The Empire Strikes Back" -> {"starwars", "theempirestrikesback"};
    titles without ":" have none.
    """
    title = _YEAR_SUFFIX.sub("", title.strip())
    if ":" not in title:
        return set()
    keys = {normalise_title(title.split(":", 1)[0])}
    episode = _EPISODE.match(title)
    if episode:
        keys.add(normalise_title(episode.group(1)))
    return {k for k in keys if k}


def read_ml1m_meta(folder: Path) -> pd.DataFrame:
    """``movies_extrainfos.dat`` (UTF-8, CRLF, 11 '::' fields) as a frame indexed by ml-1m id.

    Columns: ``year`` (int), ``plot``, ``director``, ``actors`` (None for "N/A"), ``keys``
    (set of title keys, from the OMDb title and, when present, ``movies.dat``'s title) and
    ``series_keys`` (:func:`series_keys` of the OMDb title).
    """
    path = folder / "movies_extrainfos.dat"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, f"not UTF-8 text ({exc.reason})") from None
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):  # ~3,900 lines
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) != len(EXTRAINFO_FIELDS):
            raise DataFormatError(
                path,
                lineno,
                f"expected {len(EXTRAINFO_FIELDS)} '::'-separated fields, found {len(fields)}",
            )
        rec = dict(zip(EXTRAINFO_FIELDS, (f.strip() for f in fields), strict=True))
        if not rec["year"].isdigit():
            raise DataFormatError(path, lineno, f"year {rec['year']!r} is not an integer")
        records.append(rec)
    meta = pd.DataFrame.from_records(records).drop_duplicates("ml1m_id").set_index("ml1m_id")
    meta["year"] = meta["year"].astype(int)
    for col in META_TEXT_COLUMNS:
        meta[col] = meta[col].where(~meta[col].isin(["", "N/A"]), None)
    keys = {ml1m_id: title_keys(t) for ml1m_id, t in zip(meta.index, meta["title"], strict=True)}
    movies = folder / "movies.dat"
    if movies.is_file():  # same ids, MovieLens title style; some accents are lost (U+FFFD)
        for line in movies.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split("::")
            if len(fields) == 3 and fields[0] in keys:
                keys[fields[0]] |= title_keys(fields[1])
    meta["keys"] = pd.Series(keys, dtype=object)
    meta["series_keys"] = [series_keys(t) for t in meta["title"]]
    return meta


def join_ml1m_meta(
    items: pd.DataFrame, meta: pd.DataFrame, interactions: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add ``plot``, ``director``, ``actors`` to ``items`` by title + year; return the report.

    Args:
        items: ml-100k items with ``title`` and ``year``.
        meta: :func:`read_ml1m_meta` output.
        interactions: optional, to report the share of interactions whose item matched.
    """
    by_key_year: dict[tuple[str, int], set[str]] = defaultdict(set)
    by_series_year: dict[tuple[str, int], set[str]] = defaultdict(set)
    for ml1m_id, year, keys, series in zip(
        meta.index, meta["year"], meta["keys"], meta["series_keys"], strict=True
    ):
        for key in keys:
            by_key_year[(key, year)].add(ml1m_id)
        for key in series:
            by_series_year[(key, year)].add(ml1m_id)

    matches: list[str | None] = []
    rules: dict[str, int] = {"exact": 0, "year+-1": 0, "series": 0}
    ambiguous = 0
    unmatched: list[str] = []
    for item_id, title, year in zip(items["item_id"], items["title"], items["year"], strict=True):
        found, rule = _match_one(title, year, by_key_year, by_series_year)  # 1,682 items
        if found is not None and len(found) == 1:
            matches.append(next(iter(found)))
            rules[rule] += 1
            continue
        ambiguous += found is not None and len(found) > 1
        matches.append(None)
        unmatched.append(f"{item_id}: {title or '(no title)'} ({year})")

    matched_ids = pd.Series(matches, index=items.index, dtype=object)
    out = items.copy()
    hit = matched_ids.notna().to_numpy()
    for col in META_TEXT_COLUMNS:
        values = np.full(len(out), None, dtype=object)
        values[hit] = meta.loc[matched_ids[hit].to_numpy(), col].to_numpy()
        out[col] = values
    report: dict[str, Any] = {
        "source": "ml-1m-meta/movies_extrainfos.dat (+ movies.dat titles)",
        "matched": int(hit.sum()),
        "total": len(items),
        "rate": round(float(hit.mean()), 4) if len(items) else 0.0,
        "by_rule": rules,
        "ambiguous": int(ambiguous),
        "with_plot": int(pd.notna(out["plot"]).sum()),
    }
    if interactions is not None and len(interactions):
        matched_items = set(items["item_id"][hit])
        report["interactions_covered"] = round(
            float(interactions["item_id"].isin(matched_items).mean()), 4
        )
    report["unmatched"] = unmatched
    return out, report


def _match_one(
    title: str | None,
    year: int | None,
    by_key_year: dict[tuple[str, int], set[str]],
    by_series_year: dict[tuple[str, int], set[str]],
) -> tuple[set[str] | None, str]:
    """Candidates of the first rule that finds any, and that rule's name."""
    if not title or year is None:
        return None, ""
    keys = title_keys(title)
    for rule, years in (("exact", (year,)), ("year+-1", (year - 1, year + 1))):
        found = {mid for key in keys for y in years for mid in by_key_year.get((key, y), ())}
        if found:
            return found, rule
    if ":" not in title:
        found = set(by_series_year.get((normalise_title(_PAREN.sub("", title)), year), ()))
        if found:
            return found, "series"
    return None, ""


# ---- the loader -----------------------------------------------------------------------
def detect_layout(folder: Path) -> str | None:
    """'recbole', 'grouplens' or None, from the files present in ``folder``."""
    if (folder / "ml-100k.inter").is_file() and (folder / "ml-100k.item").is_file():
        return "recbole"
    if (folder / "u.data").is_file() and (folder / "u.item").is_file():
        return "grouplens"
    return None


def load_ml100k(folder: str | Path, meta_dir: str | Path | None = None) -> Dataset:
    """Load ml-100k from ``folder`` (either layout) and join ml-1m text if available.

    Args:
        folder: the ``ml-100k`` folder.
        meta_dir: the ``ml-1m-meta`` folder; default ``folder/../ml-1m-meta``. The join is
            skipped (with a warning, recorded in ``info``) when it does not exist.

    Example::

        ds = load_ml100k("../shared/data/ml-100k")
        ds.num_users, ds.num_items, len(ds.interactions)   # (943, 1682, 100000)
        ds.info["ml1m_join"]["rate"]                        # ~0.98
    """
    folder = Path(folder)
    layout = detect_layout(folder)
    if layout == "recbole":
        items, inter = read_recbole(folder)
    elif layout == "grouplens":
        items, inter = read_grouplens(folder)
    else:
        raise DatasetNotFoundError(
            f"{folder} holds neither RecBole files (ml-100k.inter, ml-100k.item) nor the "
            "GroupLens files (u.data, u.item); run `recsys data fetch ml-100k` or pass --data-dir"
        )
    info: dict[str, Any] = {
        "source": str(folder),
        "layout": layout,
        "timestamp_unit": "unix_seconds",
        "text_columns": ["title", "year", "genres"],
    }
    meta_path = Path(meta_dir) if meta_dir is not None else folder.parent / "ml-1m-meta"
    if (meta_path / "movies_extrainfos.dat").is_file():
        items, report = join_ml1m_meta(items, read_ml1m_meta(meta_path), inter)
        info["ml1m_join"] = report
        info["text_columns"] += list(META_TEXT_COLUMNS)
        logger.info(
            "ml-1m join: %d/%d items matched (%.1f%%; %s), %.1f%% of interactions covered",
            report["matched"],
            report["total"],
            100 * report["rate"],
            ", ".join(f"{k} {v}" for k, v in report["by_rule"].items()),
            100 * report.get("interactions_covered", 0.0),
        )
    else:
        info["ml1m_join"] = {"status": f"skipped: {meta_path / 'movies_extrainfos.dat'} not found"}
        logger.warning(
            "ml-1m metadata not found at %s; items get no plot/director/actors", meta_path
        )
    return Dataset(name=NAME, items=items, interactions=inter, info=info)
