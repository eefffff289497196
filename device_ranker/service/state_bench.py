"""What the durable device state costs per RecordEvent: ``recsys bench device-state``.

The device engine runs in this process without a cloud (the gate's decisions cost the
same in every mode); RecordEvent is timed ``events`` times over ``users`` users without
durable state, then with ``sync`` "normal" and "full" on a fresh temporary state file.
Then the same with the harm guard (``--guard``): every user first gets a pushed edit
(ApplyEdit: a random rank-2 edit, scale 0.03: within the bounds), so each click is
scored by the base head and the edit and the user's evidence is written with the event
(state schema 2); a row with edits and no guard separates the guard's cost from the edits'.
The state's own write (:meth:`DeviceStateStore.record_event`) is timed alone as well (with
the evidence of a full guard window for the guard rows), and the state file's size after
the run is reported (``file_kb``, with its ``guard_rows``). Last, the open time of a state
file of R guarded users for each R in ``open_users``
(:mod:`device_ranker.service.state_open_bench`: ``open_rows`` in the output).

Example::

    out = run_state_bench(StateBenchConfig(checkpoint="ranker.pt", events=500))
    out["rows"][1]["added_p50_us"]     # normal sync's extra microseconds per event (p50)
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)


@config_dataclass
class StateBenchConfig:
    """Attributes: the ranker checkpoint, RecordEvents timed per mode, users they cycle
    over, the folder of the temporary state files (None: the system's temp folder), the
    dataset the checkpoint was trained on (recorded in the output), the
    guarded users R of the state files whose opening is timed (empty: none), the opens
    timed per file (their median is reported)."""

    checkpoint: str
    events: int = Field(2000, ge=10)
    users: int = Field(200, ge=1)
    tmp_dir: str | None = None
    dataset: str | None = None  # recorded only: the checkpoint's
    open_users: tuple[int, ...] = (10_000, 100_000)
    open_repeats: int = Field(3, ge=1)

    def __post_init__(self) -> None:
        if any(n < 1 for n in self.open_users):
            raise ValueError(f"open_users must be >= 1, got {self.open_users}")


def _pct(us: list[float]) -> dict[str, float]:
    a = np.asarray(us)
    return {"p50_us": float(np.percentile(a, 50)), "p95_us": float(np.percentile(a, 95)),
            "mean_us": float(a.mean())}  # fmt: skip


@dataclass(frozen=True)
class _Mode:
    label: str
    sync: str | None  # None: no durable state
    edits: bool = False  # every user gets a pushed edit first
    guard: bool = False  # --guard: clicks scored, evidence written with the event


MODES = (
    _Mode("no state", None),
    _Mode("state, sync=normal", "normal"),
    _Mode("state, sync=full", "full"),
    _Mode("no state, edits", None, edits=True),
    _Mode("no state, edits, guard", None, edits=True, guard=True),
    _Mode("state, sync=normal, edits", "normal", edits=True),
    _Mode("state, sync=normal, edits, guard", "normal", edits=True, guard=True),
)


async def _record_events(
    cfg: StateBenchConfig, state_path: str | None, mode: _Mode
) -> tuple[list[float], int]:
    """RecordEvent times (us, warm-up excluded) and the guard rows written."""
    import torch

    from device_ranker.edits import random_edit
    from device_ranker.service.config import DeviceConfig
    from device_ranker.service.engine import DeviceEngine
    from recsys.edit_payload import encode_payload

    config = DeviceConfig(
        checkpoint=cfg.checkpoint, seed_histories="none", state_path=state_path,
        state_sync=mode.sync or "normal", guard=mode.guard,  # type: ignore[arg-type]
    )  # fmt: skip
    engine = await asyncio.to_thread(DeviceEngine.load, config)
    await engine.start()
    items = engine.item_ids
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(items), size=cfg.events + 50)
    out = []
    try:
        if mode.edits:  # each user: one event (creates it), then a pushed edit
            gen = torch.Generator().manual_seed(0)
            for u in range(cfg.users):
                await engine.record_event(f"u{u}", items[u % len(items)], 1_600_000_000)
                edit = random_edit(engine.ranker.model.head, rank=2, scale=0.03, bias=False,
                                   generator=gen)  # fmt: skip
                await engine.apply_edit(f"u{u}", encode_payload(edit.to_flat()), "bench")
        for n, i in enumerate(picks.tolist()):
            t0 = time.perf_counter()
            await engine.record_event(f"u{n % cfg.users}", items[i], 1_700_000_000 + n)
            if n >= 50:  # warm-up not counted
                out.append((time.perf_counter() - t0) * 1e6)
        guard_rows = engine.state.guard_users() if engine.state is not None else 0
    finally:
        await engine.close()
    return out, guard_rows


def _store_only(path: Path, sync: str, events: int, window: int | None) -> list[float]:
    """record_event alone (with the evidence of a full ``window`` of clicks, or none)."""
    from device_ranker.service.state import DeviceStateStore, StoredEvidence

    state = DeviceStateStore(path, sync=sync)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    out = []
    try:
        state.write_snapshot("u", 0, [], [])
        for n in range(events):
            evidence = None
            if window is not None:
                diffs = tuple(rng.uniform(-0.5, 0.5, size=min(n + 1, window)).tolist())
                total = float(np.sum(diffs))
                evidence = StoredEvidence(window, diffs, len(diffs), total,
                                          float(np.sum(np.square(diffs))))  # fmt: skip
            t0 = time.perf_counter()
            state.record_event("u", n + 1, f"i{n % 97}", n, evidence=evidence)
            out.append((time.perf_counter() - t0) * 1e6)
    finally:
        state.close()
    return out


def _file_kb(path: Path) -> float:
    """The state file and its WAL, KiB."""
    files = [path, path.with_name(path.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists()) / 1024


def _portable(path: str) -> str:
    """``path`` with the cache folder written as ``$RECSYS_CACHE_DIR`` (results files)."""
    from recsys.settings import cache_dir

    root = str(cache_dir())
    return "$RECSYS_CACHE_DIR" + path[len(root) :] if path.startswith(root + "/") else path


def run_state_bench(cfg: StateBenchConfig) -> dict[str, Any]:
    """Time the modes; print a table; returns the figures (for ``--json``)."""
    from device_ranker.guard import GuardConfig
    from device_ranker.service.state_open_bench import run_open_bench

    window = GuardConfig().window
    rows = []
    base: dict[tuple[bool, bool], dict[str, float]] = {}  # (edits, guard) -> no-state row
    with tempfile.TemporaryDirectory(prefix="device-state-bench-", dir=cfg.tmp_dir) as tmp:
        for n, mode in enumerate(MODES):
            path = Path(tmp) / f"{n}.sqlite" if mode.sync else None
            times, guard_rows = asyncio.run(_record_events(cfg, str(path) if path else None, mode))
            timed = _pct(times)
            row: dict[str, Any] = {"mode": mode.label, **timed}
            if path is None:
                base[(mode.edits, mode.guard)] = timed
                row.update(added_p50_us=0.0, write_p50_us=0.0, file_kb=0.0, guard_rows=0)
            else:
                ref = base.get((mode.edits, mode.guard), base[(False, False)])
                alone = Path(tmp) / f"{n}-alone.sqlite"
                write = _pct(_store_only(alone, mode.sync, cfg.events,  # type: ignore[arg-type]
                                         window if mode.guard else None))  # fmt: skip
                row.update(added_p50_us=timed["p50_us"] - ref["p50_us"],
                           write_p50_us=write["p50_us"], file_kb=_file_kb(path),
                           guard_rows=guard_rows)  # fmt: skip
            rows.append(row)
        _print_rows(cfg, rows, window)
        open_rows = run_open_bench(cfg.checkpoint, cfg.open_users, Path(tmp), window=window,
                                   repeats=cfg.open_repeats) if cfg.open_users else []  # fmt: skip
    config = {"events": cfg.events, "users": cfg.users, "dataset": cfg.dataset,
              "checkpoint": _portable(cfg.checkpoint),
              "guard_window": window, "open_users": list(cfg.open_users),
              "open_repeats": cfg.open_repeats, "seed": 0}  # fmt: skip
    return {"config": config, "rows": rows, "open_rows": open_rows,
            "load_average": os.getloadavg()[0]}  # fmt: skip


def _print_rows(cfg: StateBenchConfig, rows: list[dict[str, Any]], window: int) -> None:
    head = ["mode", "p50_us", "p95_us", "mean_us", "added_p50_us", "write_p50_us", "file_kb",
            "guard_rows"]  # fmt: skip
    print(f"RecordEvent in process, {cfg.events} events over {cfg.users} users, no cloud "
          f"(guard rows: window {window}); load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [r[h] if h == "mode" else str(r[h]) if h == "guard_rows" else f"{r[h]:.1f}"
                 for h in head]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
