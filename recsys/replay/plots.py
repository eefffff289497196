"""PNG plots of a replay report (matplotlib, Agg backend: no display needed).

* ``ndcg_over_time.png``: NDCG@10 per policy over equal-count bins of the evaluated
  events in time order;
* ``ndcg_vs_budget.png``: NDCG@10 against the request budget, gate vs timer (log x),
  static and fine-tuning as reference lines;
* ``quality_vs_cost.png``: NDCG@10 against device compute per event (us, log x); the
  static model (no edit cost) is drawn at the left edge.

Example::

    paths = write_plots(summary, Path("results/replay-ml-100k"))   # name -> Path
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _time_labels(ts: list[int]) -> list[str]:
    if ts and min(ts) > 100_000_000:
        return [dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d") for t in ts]
    return [str(t) for t in ts]


def plot_over_time(summary: Mapping[str, Any], path: Path) -> Path:
    """NDCG@10 per time bin (top) and its difference to static (bottom, when a static
    policy was replayed); up to 20 distinct colours, timers dashed."""
    ot = summary["over_time"]
    x = list(range(len(ot["events"])))
    static = next((lb for lb in summary["order"] if lb == "static"), None)
    rows = 2 if static else 1
    fig, axes = plt.subplots(rows, 1, figsize=(10, 4.5 * rows), sharex=True, squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for i, label in enumerate(summary["order"]):
        style = "--" if "timer" in label else "-"
        kw = {"marker": ".", "label": label, "linewidth": 1.2, "color": colours[i % 20]}
        y = np.asarray(ot["ndcg@10"][label])
        axes[0, 0].plot(x, y, style, **kw)
        if static:
            axes[1, 0].plot(x, y - np.asarray(ot["ndcg@10"][static]), style, **kw)
    ticks = x[:: max(1, len(x) // 8)]
    bottom = axes[-1, 0]
    bottom.set_xticks(
        ticks, [_time_labels(ot["t_start"])[i] for i in ticks], rotation=30, ha="right"
    )
    bottom.set_xlabel(
        f"evaluated events in time order ({len(x)} bins of ~{ot['events'][0]} events; bin start)"
    )
    axes[0, 0].set_ylabel("NDCG@10")
    axes[0, 0].set_title(f"{summary['meta']['dataset']['name']}: NDCG@10 over the replay period")
    if static:
        axes[1, 0].set_ylabel("NDCG@10 minus static")
        axes[1, 0].axhline(0.0, color="black", linewidth=0.8)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_vs_budget(summary: Mapping[str, Any], path: Path) -> Path:
    pol = summary["policies"]
    fig, ax = plt.subplots(figsize=(7, 5))
    for kind in ("system", "duet"):
        for trigger, marker in (("gate", "o"), ("timer", "s")):
            pts = sorted(
                (p["request_rate"], p["ndcg@10"], p["budget"])
                for p in pol.values()
                if p["kind"] == kind and p["trigger"] == trigger
            )
            if pts:
                ax.plot(
                    [r for r, _, _ in pts],
                    [n for _, n, _ in pts],
                    marker=marker,
                    linestyle="-" if trigger == "gate" else "--",
                    label=f"{kind} {trigger}",
                )
    for p_label, p in pol.items():
        if p["kind"] in ("static", "finetune"):
            ax.axhline(
                p["ndcg@10"],
                color="grey" if p["kind"] == "static" else "tab:red",
                linestyle=":",
                label=p_label,
            )
    ax.set_xscale("log")
    ax.set_xlabel("realised request rate (requests / evaluated event; budgets 5-100%)")
    ax.set_ylabel("NDCG@10")
    ax.set_title("NDCG@10 vs request budget: gate vs timer")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_vs_cost(summary: Mapping[str, Any], path: Path) -> Path:
    pol = summary["policies"]
    costs = [p["device_us_per_event"] for p in pol.values() if p["device_us_per_event"] > 0]
    floor = min(costs) / 3 if costs else 1.0
    fig, ax = plt.subplots(figsize=(8, 5))
    points: dict[tuple[float, float], list[str]] = {}  # identical results share one label
    for label in summary["order"]:
        p = pol[label]
        x = p["device_us_per_event"] or floor
        points.setdefault((x, p["ndcg@10"]), []).append(
            label if p["device_us_per_event"] else f"{label} (0 us)"
        )
    for (x, y), labels in points.items():
        ax.scatter([x], [y], s=30)
        ax.annotate(
            " = ".join(labels), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("device compute per evaluated event (us, measured; log scale)")
    ax.set_ylabel("NDCG@10")
    ax.set_title("Quality vs device cost")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(summary: Mapping[str, Any], out: Path) -> dict[str, Path]:
    return {
        "ndcg_over_time": plot_over_time(summary, out / "ndcg_over_time.png"),
        "ndcg_vs_budget": plot_vs_budget(summary, out / "ndcg_vs_budget.png"),
        "quality_vs_cost": plot_vs_cost(summary, out / "quality_vs_cost.png"),
    }
