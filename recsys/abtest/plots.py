"""PNG plots of an analysis (matplotlib, Agg backend: no display needed).

* ``effects.png``: per metric, every treatment arm's relative difference vs control with
  its Welch CI, the CUPED-adjusted CI and the bootstrap CI.
* ``sequential.png``: per treatment arm, the primary metric's difference over the days
  with the mSPRT confidence sequence (valid at every look) and the fixed-horizon CI of
  the last day for comparison.

Example::

    files = make_plots(report, out_dir)      # ['effects.png', 'sequential.png']
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _none_to_nan(xs) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in xs], dtype=np.float64)


def plot_effects(report: dict, path: Path) -> None:
    metrics = list(report["comparisons"])
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(8.5, 1.2 + 1.3 * len(metrics)), squeeze=False
    )
    control = report["experiment"]["control"]
    intervals = (
        ("Welch", lambda r: r["welch"], "tab:blue"),
        ("CUPED", lambda r: r["cuped"], "tab:green"),
        ("bootstrap", lambda r: {**r["bootstrap"], "diff": r["welch"]["diff"]}, "tab:orange"),
    )
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        per_arm = report["comparisons"][metric]
        arms = list(per_arm)
        base = per_arm[arms[0]]["welch"]["mean_c"]
        # relative (% of the control mean) unless the control mean is 0 (e.g. request rate)
        scale, unit = (100.0 / abs(base), "% of control") if base else (1.0, "absolute")
        for k, (label, get, color) in enumerate(intervals):
            for i, arm in enumerate(arms):
                r = get(per_arm[arm])
                if not r or r.get("ci_low") is None:
                    continue
                mid, lo, hi = (scale * r[key] for key in ("diff", "ci_low", "ci_high"))
                ax.errorbar(
                    mid,
                    i + 0.2 * (k - 1),
                    xerr=[[mid - lo], [hi - mid]],
                    fmt="o",
                    color=color,
                    capsize=3,
                    label=label if i == 0 else None,
                )
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(np.arange(len(arms)), arms)
        ax.set_title(f"{metric}: difference vs {control} ({unit})", fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    axes[-1, 0].set_xlabel("difference with 95 % CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sequential(report: dict, path: Path) -> bool:
    """Returns False (and writes nothing) when there is no per-day data."""
    metric = report["experiment"]["primary_metric"]
    per_arm = {
        a: r
        for a, r in report["comparisons"][metric].items()
        if r["sequential"] and r["sequential"].get("tau") is not None
    }
    if not per_arm:
        return False
    fig, axes = plt.subplots(1, len(per_arm), figsize=(5.5 * len(per_arm), 3.8), squeeze=False)
    for ax, (arm, r) in zip(axes[0], per_arm.items(), strict=True):
        s = r["sequential"]
        days = np.array(s["days"]) + 1
        d = _none_to_nan(s["diff"])
        lo, hi = _none_to_nan(s["cs_low"]), _none_to_nan(s["cs_high"])
        ax.fill_between(
            days,
            lo,
            hi,
            step="post",
            alpha=0.25,
            color="tab:purple",
            label="mSPRT confidence sequence",
        )
        ax.step(days, d, where="post", color="tab:purple", label="difference")
        w = r["welch"]
        ax.errorbar(
            days[-1] + 0.5,
            w["diff"],
            yerr=[[w["diff"] - w["ci_low"]], [w["ci_high"] - w["diff"]]],
            fmt="s",
            color="tab:blue",
            capsize=3,
            label="fixed-horizon CI (final)",
        )
        ax.axhline(0, color="grey", lw=0.8)
        if s["first_reject_day"] is not None:
            ax.axvline(
                s["first_reject_day"] + 1, color="tab:red", ls="--", lw=1, label="H0 rejected"
            )
        shown = np.concatenate([lo, hi, d, [w["ci_low"], w["ci_high"]]])
        shown = shown[np.isfinite(shown)]
        if shown.size:
            span = float(np.max(np.abs(shown)))
            ax.set_ylim(-1.1 * span, 1.1 * span)
        ax.set_title(f"{metric}: {arm} - {report['experiment']['control']}")
        ax.set_xlabel("day of the experiment")
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_plots(report: dict, out: str | Path) -> list[str]:
    """Write the plots into ``out``; returns their file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ["effects.png"]
    plot_effects(report, out / "effects.png")
    if plot_sequential(report, out / "sequential.png"):
        files.append("sequential.png")
    return files


def plot_aa_pvalues(p_values, path: Path) -> None:
    """Histogram of A/A p-values (uniform on [0, 1] when the test is calibrated)."""
    p = np.asarray(p_values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.hist(p, bins=20, range=(0, 1), color="tab:blue", alpha=0.8, edgecolor="white")
    ax.axhline(len(p) / 20, color="tab:red", ls="--", lw=1, label="uniform")
    ax.set_xlabel("A/A Welch p-value")
    ax.set_ylabel("salts")
    ax.set_title(f"A/A p-values over {len(p)} salts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
