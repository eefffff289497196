"""The open-time screen of a device state file's harm-guard rows: which rows the exact
per-row check (:meth:`DeviceStateStore._parse_guard`) must look at, found with two SQL
scans and a few numpy passes instead of Python per row (:func:`suspect_guard_rows`).

Why: a file with R guarded users (10^5 to 10^6 on a busy device) was checked row by
row in Python at every start, about 20 µs a row (1.9 s at 10^5, 20 s at 10^6, measured
by ``recsys bench device-state --open-users``). The screen does the same checks over all
rows at once (0.5 s at 10^5, 5 s at 10^6: about 5 µs a row, most of it fetching the
evidence columns into Python):

* in SQL (a scan of the ``guard`` table, no Python per row): the storage types (the
  evidence all NULL, or an integer window >= 1, an integer click count >= 0, a diffs blob
  of whole float64 values no longer than the window or the clicks, REAL sums; a NaN sum
  is stored as NULL and so fails), a known holder, a candidate payload (a blob) exactly
  when held and with its info, the info a JSON object, no candidate beside an active
  edit (looked up only for the rows holding one);
* in numpy over the blobs and sums fetched by a second scan, in chunks (``R`` rows,
  ``V`` stored differences in all): every difference finite and in [-1, 1], the sums finite
  and the consistency inequalities of :func:`device_ranker.guard.check_evidence`.

It is **conservative by construction**: a row the exact check would refuse is always
flagged (the numpy sums differ from ``math.fsum`` by less than the margin the tolerance
is tightened by; any unexpected storage type is flagged, not converted), and
a flagged row is refused only if the exact check refuses it, with the same message.
So the guarantee is unchanged: a bad row stops the file opening with a DataFormatError
naming the file, the user and the fix, and nothing is loaded;
``tests/device_ranker/service/test_state_screen.py`` checks the screen flags every
row the exact check refuses (the corruptions, and hypothesis over near-boundary rows).

Not chosen: checking only what SQL can at open and the blobs when a user is loaded
(about 1 s at 10^6, the scan alone) would let a device start on a file whose bad rows it
finds later, one failed request at a time; and a checksum per row would still be read
and compared per row, and would not catch a row written wrong by this code.

Example::

    rowids = suspect_guard_rows(db)      # [] for a sound file
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import numpy as np

# a row whose every column is of the stored type and whose non-numeric invariants hold
# (used in WHERE, where AND and OR short-circuit: the candidate's checks and the users
# lookup run only for the rows holding one)
_ROW_OK = """(
    (window IS NULL AND diffs IS NULL AND clicks IS NULL AND gain_sum IS NULL
     AND gain_squares IS NULL)
    OR (typeof(window) = 'integer' AND window >= 1
        AND typeof(clicks) = 'integer' AND clicks >= 0
        AND typeof(diffs) = 'blob' AND length(diffs) % 8 = 0
        AND length(diffs) / 8 <= min(window, clicks)
        AND typeof(gain_sum) = 'real' AND typeof(gain_squares) = 'real')
) AND (
    (held_by = '' AND candidate_payload IS NULL AND candidate_info IS NULL)
    OR (typeof(held_by) = 'text' AND held_by IN ('device', 'fleet')
        AND typeof(candidate_payload) = 'blob' AND length(candidate_payload) > 0
        AND typeof(candidate_info) = 'text'
        AND instr(CAST(candidate_info AS BLOB), x'00') = 0  -- json_valid stops at a NUL
        AND json_valid(candidate_info)
        AND json_type(candidate_info) = 'object'
        AND NOT EXISTS (SELECT 1 FROM users AS u
                        WHERE u.user_id = g.user_id AND u.edit_payload IS NOT NULL))
)"""

# the evidence rows of the stored types, for the numeric checks
_EVIDENCE = """
SELECT rowid, diffs, clicks, gain_sum, gain_squares FROM guard
WHERE typeof(diffs) = 'blob' AND length(diffs) % 8 = 0 AND typeof(clicks) = 'integer'
  AND typeof(gain_sum) = 'real' AND typeof(gain_squares) = 'real'
"""

_EPS = float(np.finfo(np.float64).eps)
_CHUNK = 1 << 16  # rows fetched and checked at once (bounded memory at 10^6 users)


def suspect_guard_rows(db: sqlite3.Connection) -> list[int]:
    """The rowids (ascending) of the guard rows the exact check must see: every row it
    would refuse, and possibly a few it accepts (see the module docstring)."""
    found = {r[0] for r in db.execute(f"SELECT rowid FROM guard AS g WHERE NOT ({_ROW_OK})")}
    cursor = db.execute(_EVIDENCE)
    while rows := cursor.fetchmany(_CHUNK):
        rowids, blobs, clicks, total, squares = zip(*rows, strict=True)
        flagged = numeric_suspects(blobs, clicks, total, squares)
        found.update(rowids[i] for i in np.flatnonzero(flagged))
    return sorted(found)


def numeric_suspects(
    blobs: Sequence[bytes], clicks: Sequence[int], total: Sequence[float], squares: Sequence[float]
) -> np.ndarray:
    """[R] bool: the evidence rows that may fail :func:`~device_ranker.guard.check_evidence`
    (the storage types already checked: ``blobs`` whole float64 values, at most
    ``min(window, clicks)`` of them; ``clicks`` whole numbers >= 0).

    Args:
        blobs: R float64 little-endian blobs (the window's differences; b"": none).
        clicks, total, squares: R cumulative clicks, sums and sums of squares.
    """
    r = len(blobs)
    n = np.fromiter(map(len, blobs), dtype=np.int64, count=r) // 8  # [R]
    d = np.frombuffer(b"".join(blobs), dtype="<f8")  # [V]
    row = np.repeat(np.arange(r), n)  # [V] the row each difference belongs to
    c = np.asarray(clicks, dtype=np.float64)  # [R]
    s = np.asarray(total, dtype=np.float64)  # [R]
    q = np.asarray(squares, dtype=np.float64)  # [R]
    with np.errstate(invalid="ignore", over="ignore"):
        flagged = np.zeros(r, dtype=bool)
        flagged[row[~(np.abs(d) <= 1.0)]] = True  # NaN, infinite or outside [-1, 1]
        flagged |= ~np.isfinite(s) | ~np.isfinite(q)
        w_sum = np.bincount(row, weights=d, minlength=r)  # [R] sequential per row
        w_sq = np.bincount(row, weights=d * d, minlength=r)  # [R]
        # check_evidence's tolerance, tightened by more than the numpy sums can differ
        # from math.fsum for differences in [-1, 1] ((n - 1) eps sum |d| for a sequential
        # sum, eps |sum| / 2 for fsum, the roundings of the comparisons' own terms)
        tol = 1e-9 * np.maximum(c, 1.0) - 4.0 * _EPS * ((n + 1.0) ** 2 + c + 1.0)
        older = c - n
        flagged |= (
            (q < -tol)
            | (q > c + tol)
            | (np.abs(s) > c + tol)
            | (s * s > c * q + tol * (1.0 + c))
            | (w_sq > q + tol)
            | (np.abs(s - w_sum) > older + tol)
            | (q - w_sq > older + tol)
        )
    return flagged
