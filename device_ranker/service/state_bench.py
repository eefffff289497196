"""What the durable device state costs per RecordEvent: ``recsys bench device-state``.

The device engine runs in this process without a cloud (the gate's decisions cost the
same in every mode); RecordEvent is timed ``events`` times over ``users`` users without
durable state, then with ``sync`` "normal" and "full" on a fresh temporary state file.
The state's own write (:meth:`DeviceStateStore.record_event`) is timed alone as well.

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
from pathlib import Path
from typing import Any

import numpy as np

from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)


@config_dataclass
class StateBenchConfig:
    """Attributes: the ranker checkpoint, RecordEvents timed per mode, users they cycle
    over, the folder of the temporary state files (None: the system's temp folder)."""

    checkpoint: str
    events: int = Field(2000, ge=10)
    users: int = Field(200, ge=1)
    tmp_dir: str | None = None


def _pct(us: list[float]) -> dict[str, float]:
    a = np.asarray(us)
    return {"p50_us": float(np.percentile(a, 50)), "p95_us": float(np.percentile(a, 95)),
            "mean_us": float(a.mean())}  # fmt: skip


async def _record_events(cfg: StateBenchConfig, state_path: str | None, sync: str) -> list[float]:
    from device_ranker.service.config import DeviceConfig
    from device_ranker.service.engine import DeviceEngine

    config = DeviceConfig(
        checkpoint=cfg.checkpoint, seed_histories="none", state_path=state_path,
        state_sync=sync,  # type: ignore[arg-type]
    )  # fmt: skip
    engine = await asyncio.to_thread(DeviceEngine.load, config)
    await engine.start()
    items = engine.item_ids
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(items), size=cfg.events + 50)
    out = []
    try:
        for n, i in enumerate(picks.tolist()):
            t0 = time.perf_counter()
            await engine.record_event(f"u{n % cfg.users}", items[i], 1_700_000_000 + n)
            if n >= 50:  # warm-up not counted
                out.append((time.perf_counter() - t0) * 1e6)
    finally:
        await engine.close()
    return out


def _store_only(path: Path, sync: str, events: int) -> list[float]:
    from device_ranker.service.state import DeviceStateStore

    state = DeviceStateStore(path, sync=sync)  # type: ignore[arg-type]
    out = []
    try:
        state.write_snapshot("u", 0, [], [])
        for n in range(events):
            t0 = time.perf_counter()
            state.record_event("u", n + 1, f"i{n % 97}", n)
            out.append((time.perf_counter() - t0) * 1e6)
    finally:
        state.close()
    return out


def run_state_bench(cfg: StateBenchConfig) -> dict[str, Any]:
    """Time the three modes; print a table; returns the figures (for ``--json``)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="device-state-bench-", dir=cfg.tmp_dir) as tmp:
        base = _pct(asyncio.run(_record_events(cfg, None, "normal")))
        rows.append({"mode": "no state", **base, "added_p50_us": 0.0, "write_p50_us": 0.0})
        for sync in ("normal", "full"):
            path = str(Path(tmp) / f"{sync}.sqlite")
            timed = _pct(asyncio.run(_record_events(cfg, path, sync)))
            write = _pct(_store_only(Path(tmp) / f"{sync}-alone.sqlite", sync, cfg.events))
            rows.append({"mode": f"state, sync={sync}", **timed,
                         "added_p50_us": timed["p50_us"] - base["p50_us"],
                         "write_p50_us": write["p50_us"]})  # fmt: skip
    head = ["mode", "p50_us", "p95_us", "mean_us", "added_p50_us", "write_p50_us"]
    print(f"RecordEvent in process, {cfg.events} events over {cfg.users} users, no cloud; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r[h] if h == "mode" else f"{r[h]:.1f}" for h in head) + " |")
    return {"config": {"events": cfg.events, "users": cfg.users, "checkpoint": cfg.checkpoint},
            "rows": rows, "load_average": os.getloadavg()[0]}  # fmt: skip
