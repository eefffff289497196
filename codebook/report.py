"""Codebook quality report: code usage per level, collisions, reconstruction error.

Shapes: I items, D dim, L quantised levels (+1 disambiguation level), K codes.

Figures, per level l (rows of the table):

* ``used`` / ``usage``: distinct codes any item takes, and that count / K.
* ``perplexity``: exp(H) of the level's code distribution p_k = n_k / I, where
  H = -sum_k p_k ln p_k; K when all codes are equally used, 1 when one code takes all.
* ``dead``: K - used.
* ``rel_mse``: ||X - X^_l||^2 / ||X||^2 where X^_l decodes the first l levels only
  (falls level by level; the last quantised row is the codebook's error).
* ``unexplained_var``: ||X - X^_l||^2 / ||X - mean(X)||^2, the same error relative to
  the spread of the items (1.0 = no better than every item at the catalogue mean).
  Fused features of some catalogues share a large common direction (TikTok's raw
  visual/audio vectors are non-negative), which makes ``rel_mse`` look small; this
  column is the fairer one across catalogues.

Overall: collision rate before disambiguation (share of items whose L codes repeat an
earlier item's; see :func:`codebook.semantic_ids.collision_stats`), items in colliding
groups, the largest group (= size of the disambiguation level), and whether the final
IDs are unique (they must be).

Example::

    report = codebook_report(x, quantizer, ids, method="rqkmeans", seconds=1.2)
    print(report.to_markdown())
    report.to_dict()            # JSON-ready
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from codebook.quantizer import ResidualQuantizer, relative_mse
from codebook.semantic_ids import SemanticIdMap

logger = logging.getLogger(__name__)


def usage_stats(codes: np.ndarray, num_codes: int) -> dict[str, float | int]:
    """Code usage of one level: int codes [I] in [0, K) -> used, usage, perplexity, dead."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=num_codes).astype(np.float64)
    total = counts.sum()
    p = counts[counts > 0] / total if total else np.ones(1)
    used = int((counts > 0).sum())
    return {
        "used": used,
        "usage": used / num_codes if num_codes else 0.0,
        "perplexity": float(math.exp(-(p * np.log(p)).sum())),
        "dead": int(num_codes - used),
    }


@dataclass
class LevelReport:
    """One row of the report table (``rel_mse`` / ``unexplained_var`` None for the
    disambiguation level, which adds no reconstruction)."""

    level: str
    kind: str  # "quantised" or "disambiguation"
    codes: int
    used: int
    usage: float
    perplexity: float
    dead: int
    rel_mse: float | None
    unexplained_var: float | None


@dataclass
class CodebookReport:
    """Everything the CLI prints and writes to --json."""

    method: str
    items: int
    dim: int
    levels: list[LevelReport]
    collision_rate: float
    colliding_items: float
    colliding_groups: int
    max_per_prefix: int
    unique_prefixes: int
    final_unique: bool
    rel_mse: float
    unexplained_var: float
    vocab_size: int
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """Per-level rows for a table ("-" for figures that do not apply)."""
        return [
            {k: ("-" if v is None else v) for k, v in asdict(level).items()}
            for level in self.levels
        ]

    def summary(self) -> dict[str, Any]:
        """The overall figures as one flat dict."""
        out = {k: v for k, v in asdict(self).items() if k not in ("levels", "extra")}
        out.update(self.extra)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "levels": [asdict(level) for level in self.levels]}

    def to_markdown(self) -> str:
        """The per-level table plus one summary line per overall figure."""
        lines = [_markdown_table(self.rows())]
        s = self.summary()
        lines.append(
            f"items {s['items']:,}, dim {s['dim']}, method {s['method']}: "
            f"collision rate before disambiguation {s['collision_rate']:.4f} "
            f"({s['colliding_groups']:,} prefixes shared by {s['colliding_items']:.2%} of items, "
            f"at most {s['max_per_prefix']} per prefix); final IDs unique: {s['final_unique']}; "
            f"rel. MSE {s['rel_mse']:.4f}, unexplained variance {s['unexplained_var']:.4f}; "
            f"vocabulary {s['vocab_size']:,} tokens"
            + (f"; {s['seconds']:.1f} s" if s.get("seconds") is not None else "")
        )
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join(out)


def codebook_report(
    x: np.ndarray,
    quantizer: ResidualQuantizer,
    ids: SemanticIdMap,
    seconds: float | None = None,
    extra: dict[str, Any] | None = None,
) -> CodebookReport:
    """Measure a trained quantiser and its semantic IDs on the item vectors.

    Args:
        x: float32 [I, D], the vectors the quantiser was trained on.
        quantizer: the trained quantiser (its codes must be ``ids.codes[:, :L]``).
        ids: the semantic IDs built from those codes.
        seconds: training time, reported as is.
        extra: more summary figures (dataset, fingerprint, ...).
    """
    x = np.asarray(x, dtype=np.float32)
    codes = ids.codes[:, : ids.quantised_levels]  # [I, L]
    centred = x - x.mean(axis=0, keepdims=True)
    mean = x.mean(axis=0, keepdims=True)
    levels: list[LevelReport] = []
    for level in range(ids.quantised_levels):
        x_hat = quantizer.decode(codes[:, : level + 1])  # [I, D] from the first level+1 levels
        levels.append(
            LevelReport(
                level=ids.level_names[level],
                kind="quantised",
                codes=ids.vocab_sizes[level],
                **usage_stats(codes[:, level], ids.vocab_sizes[level]),  # type: ignore[arg-type]
                rel_mse=relative_mse(x, x_hat),
                unexplained_var=relative_mse(centred, x_hat - mean),
            )
        )
    last = ids.num_levels - 1
    levels.append(
        LevelReport(
            level=ids.level_names[last],
            kind="disambiguation",
            codes=ids.vocab_sizes[last],
            **usage_stats(ids.codes[:, last], ids.vocab_sizes[last]),  # type: ignore[arg-type]
            rel_mse=None,
            unexplained_var=None,
        )
    )
    col = ids.collisions
    return CodebookReport(
        method=quantizer.method,
        items=ids.num_items,
        dim=int(x.shape[1]),
        levels=levels,
        collision_rate=float(col["collision_rate"]),
        colliding_items=float(col["colliding_items"]),
        colliding_groups=int(col["colliding_groups"]),
        max_per_prefix=int(col["max_per_prefix"]),
        unique_prefixes=int(col["unique_prefixes"]),
        final_unique=len(np.unique(ids.codes, axis=0)) == ids.num_items,
        rel_mse=levels[ids.quantised_levels - 1].rel_mse or 0.0,
        unexplained_var=levels[ids.quantised_levels - 1].unexplained_var or 0.0,
        vocab_size=ids.vocab_size,
        seconds=seconds,
        extra=dict(extra or {}),
    )
