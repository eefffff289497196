"""Helpers of the cloud service tests: a background event loop and a tiny catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from llm_cloud.service.server import CloudConfig, CloudHandle, start_cloud

T = TypeVar("T")
HEAD = {"fc0": (16, 8), "fc1": (8, 16)}
ITEMS = [f"i{n}" for n in range(30)]


def write_catalogue(root: Path) -> Path:
    """A canonical dataset with the 30 items of :data:`ITEMS` (for the tiny engine)."""
    from recsys.data import Dataset, write_dataset

    rng = np.random.default_rng(0)
    rows = [(f"u{u}", ITEMS[int(i)], t) for t, (u, i) in
            enumerate(zip(rng.integers(0, 5, 60), rng.integers(0, 30, 60), strict=True))]  # fmt: skip
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": ITEMS})
    return Path(write_dataset(Dataset("catalogue", items, inter), root / "catalogue"))


def start(bg, catalogue: Path, store: Path | None, **kw) -> CloudHandle:
    cfg = CloudConfig(
        engine="tiny",
        dataset=str(catalogue),
        head_spec="fc0=16x8,fc1=8x16",
        store_url=f"sqlite:///{store}" if store else None,
        **kw,
    )
    return bg.run(start_cloud(cfg))
