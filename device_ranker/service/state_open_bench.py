"""What opening a device state file with R guarded users costs: the open-time check of
every harm-guard row (``recsys bench device-state --open-users``).

For each R a state file is built directly (one transaction of ``executemany``, no
journal): R users, each with a snapshot of ``history`` events and a guard row with a
full window of evidence (``window`` gain differences, uniform in [-0.5, 0.5], and
cumulative sums over 20 to 100 clicks consistent with it); every 10th user holds a
candidate edit ("device"), six in ten have an active edit, the rest none (the payloads
are one real RSE1 edit of the ranker's head, rank 2: the bytes a device stores). Then
:class:`~device_ranker.service.state.DeviceStateStore` opens it ``repeats`` times
(``open_s``: the median; the file is fsync'ed after the build, and the page cache is
warm: it was just written), its guard check is timed alone (``screen_s``: SQL and numpy
over all rows, the per-row check for the rows they flag) and once as every row checked
in Python (``exact_s``: how the file was opened before). Shapes: R users, m = ``window``.

Example::

    rows = run_open_bench("ranker.pt", [10_000, 100_000], Path("/tmp"), window=20)
    rows[1]["open_s"]          # seconds to open a file of 10^5 guarded users
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HELD_EVERY = 10  # every 10th user holds a candidate
EDIT_SHARE = 6  # users n % 10 in 1..6 have an active edit


def edit_payload(checkpoint: str) -> bytes:
    """One real RSE1 payload (a random rank-2 edit of the ranker's head, scale 0.03)."""
    import torch

    from device_ranker.edits import random_edit
    from device_ranker.ranker import Ranker
    from recsys.edit_payload import encode_payload

    head = Ranker.from_checkpoint(checkpoint).model.head
    edit = random_edit(head, rank=2, scale=0.03, bias=False,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    return encode_payload(edit.to_flat())


def _rows(users: int, window: int, history: int, payload: bytes, seed: int) -> Iterator[tuple]:
    """(users row, guard row) per user, in chunks' worth of numpy draws."""
    rng = np.random.default_rng(seed)
    info = json.dumps({"edit_id": 1, "prototype_id": 0, "prototype_version": 0,
                       "source": "cloud", "payload_bytes": len(payload)})  # fmt: skip
    hist = json.dumps(
        [[f"i{t}", 1_700_000_000 + t] for t in range(history)], separators=(",", ":")
    )  # the same snapshot for all (its size is what counts)
    chunk = 10_000
    for lo in range(0, users, chunk):
        k = min(chunk, users - lo)
        diffs = rng.uniform(-0.5, 0.5, size=(k, window))  # [k, m]
        older = rng.integers(0, 81, size=k)  # [k] clicks before the window
        old_mean = rng.uniform(-0.1, 0.1, size=k)  # [k]
        w_sum, w_sq = diffs.sum(1), np.square(diffs).sum(1)  # [k]
        total = w_sum + older * old_mean  # the older clicks: mean old_mean, squares 1/12
        squares = w_sq + older * (old_mean**2 + 1 / 12)
        for j in range(k):
            n = lo + j
            user = f"u{n}"
            held, edited = n % HELD_EVERY == 0, 1 <= n % HELD_EVERY <= EDIT_SHARE
            yield (
                (user, history, hist, "[]", payload if edited else None, None,
                 info if edited else None, 0),
                (user, window, diffs[j].astype("<f8").tobytes(), int(window + older[j]),
                 float(total[j]), float(squares[j]), "device" if held else "",
                 payload if held else None, None, info if held else None, 0),
            )  # fmt: skip


def build_state_file(
    path: Path, users: int, *, window: int, history: int, payload: bytes, seed: int = 0
) -> None:
    """A state file of ``users`` guarded users (see the module docstring)."""
    from device_ranker.service.state import DeviceStateStore

    DeviceStateStore(path).close()  # the schema, as a device writes it
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")  # a bulk load: no WAL copy, no journal
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        pairs = _rows(users, window, history, payload, seed)
        user_rows: list[tuple] = []
        guard_rows: list[tuple] = []
        for u, g in pairs:
            user_rows.append(u)
            guard_rows.append(g)
            if len(user_rows) == 50_000:
                _insert(db, user_rows, guard_rows)
                user_rows, guard_rows = [], []
        _insert(db, user_rows, guard_rows)
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")  # as the device leaves it
    finally:
        db.close()
    fd = os.open(path, os.O_RDONLY)  # on disk before it is timed (no write-back meanwhile)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _insert(db: sqlite3.Connection, user_rows: list[tuple], guard_rows: list[tuple]) -> None:
    db.executemany(
        "INSERT INTO users (user_id, position, history, seen, edit_payload, proto_payload, "
        "edit_info, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        user_rows,
    )
    db.executemany(
        "INSERT INTO guard (user_id, window, diffs, clicks, gain_sum, gain_squares, held_by, "
        "candidate_payload, candidate_proto, candidate_info, updated_ms) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        guard_rows,
    )


def _file_mb(path: Path) -> float:
    files = [path, path.with_name(path.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def open_row(
    path: Path, users: int, *, window: int, history: int, payload: bytes, repeats: int
) -> dict[str, Any]:
    """Build the file of ``users`` guarded users at ``path``, time its opening."""
    from device_ranker.service.state import DeviceStateStore

    build_s = _timed(lambda: build_state_file(path, users, window=window, history=history,
                                              payload=payload))  # fmt: skip
    opens, screens = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = DeviceStateStore(path)
        opens.append(time.perf_counter() - t0)
        try:
            screens.append(_timed(state.check_guards))
        finally:
            state.close()
    state = DeviceStateStore(path)
    try:
        t0 = time.perf_counter()
        rows = state.check_guards(screen=False)
        exact_s = time.perf_counter() - t0
        held = int(state.db.execute("SELECT count(*) FROM guard WHERE held_by != ''").fetchone()[0])
    finally:
        state.close()
    open_s, screen_s = statistics.median(opens), statistics.median(screens)
    return {
        "users": users, "guard_rows": rows, "held": held, "file_mb": _file_mb(path),
        "build_s": build_s, "open_s": open_s, "open_us_per_user": open_s / users * 1e6,
        "screen_s": screen_s, "exact_s": exact_s, "exact_over_screen": exact_s / screen_s,
    }  # fmt: skip


def run_open_bench(
    checkpoint: str,
    users: Sequence[int],
    tmp: Path,
    *,
    window: int,
    history: int = 20,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """One :func:`open_row` per size in ``users`` (files in ``tmp``, each deleted after
    its row); prints a table."""
    payload = edit_payload(checkpoint)
    rows = []
    for n in users:
        path = tmp / f"open-{n}.sqlite"
        rows.append(open_row(path, n, window=window, history=history, payload=payload,
                             repeats=repeats))  # fmt: skip
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            f.unlink(missing_ok=True)
    head = ["users", "guard_rows", "held", "file_mb", "build_s", "open_s", "open_us_per_user",
            "screen_s", "exact_s", "exact_over_screen"]  # fmt: skip
    print(f"\nOpening a state file of R guarded users (window {window}, snapshots of {history} "
          f"events, a {len(payload)}-byte edit or candidate for 7 in 10; median of {repeats} "
          "opens, page cache warm; exact_s: every guard row checked in Python, as before)")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [f"{r[h]:,}" if isinstance(r[h], int) else
                 f"{r[h]:.1f}" if h in ("file_mb", "open_us_per_user", "exact_over_screen")
                 else f"{r[h]:.3f}" for h in head]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    return rows
