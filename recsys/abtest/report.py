"""Write the analysis: ``report.json`` (every number) and ``report.md`` (verdicts, tables,
plots). The rows printed by ``recsys abtest analyze`` come from :func:`summary_rows`, so the
terminal, the Markdown and the JSON show the same figures.

Example::

    write_report(out_dir, report, plots=["effects.png", "sequential.png"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def arm_rows(report: dict) -> list[dict[str, Any]]:
    """One row per arm: users and the mean of every metric."""
    metrics = _metrics(report)
    rows = []
    for name, a in report["arms"].items():
        row: dict[str, Any] = {"arm": name, "weight": a["weight"], "users": a["n"]}
        row.update({m: a["means"][m] for m in metrics})
        rows.append(row)
    return rows


def summary_rows(report: dict) -> list[dict[str, Any]]:
    """One row per (metric, treatment arm): the differences, CIs, p-values and verdict."""
    rows = []
    for metric, per_arm in report["comparisons"].items():
        for arm, r in per_arm.items():
            w, b, c = r["welch"], r["bootstrap"], r["cuped"]
            seq = r["sequential"] or {}
            rows.append(
                {
                    "metric": metric,
                    "arm": arm,
                    "diff": w["diff"],
                    "rel": _pct(w["rel"]),
                    "welch 95% CI": f"[{_f(w['ci_low'])}, {_f(w['ci_high'])}]",
                    "bootstrap CI": f"[{_f(b['ci_low'])}, {_f(b['ci_high'])}]",
                    "CUPED diff": _f(c["diff"]) if c else "n/a",
                    "CUPED CI": f"[{_f(c['ci_low'])}, {_f(c['ci_high'])}]" if c else "n/a",
                    "p (Holm)": _f(r["p_holm"]),
                    "seq. p": _f(seq.get("p_value")),
                    "MDE": _pct(r["power"]["mde_rel"]),
                    "verdict": r["verdict"],
                }
            )
    return rows


def _metrics(report: dict) -> list[str]:
    return list(report["comparisons"])


def render_markdown(report: dict, plots: list[str]) -> str:
    """The Markdown report."""
    exp = report["experiment"]
    conf = 1 - exp["analysis"]["alpha"]
    srm = report["srm"]
    lines = [f"# A/B test report: {exp['name']}", ""]
    if exp.get("description"):
        lines += [exp["description"], ""]
    lines += [
        f"Control arm: `{exp['control']}`. Primary metric: `{exp['primary_metric']}`; "
        f"guardrails: {', '.join(f'`{g}`' for g in exp['guardrail_metrics']) or 'none'}; "
        f"secondary: {', '.join(f'`{g}`' for g in exp['secondary_metrics']) or 'none'}. "
        f"{report['users']:,} exposed users over {report['days']} day(s). Intervals are "
        f"{100 * conf:g} %; p-values across treatment arms are Holm-corrected per metric. "
        "Verdicts use the fixed-horizon test (CUPED-adjusted Welch when a covariate exists) "
        "and are valid once, at the planned end; to stop early while the experiment runs, use "
        "only the sequential (mSPRT) p-value, which stays valid under daily peeking.",
        "",
        "## Verdict",
        "",
    ]
    if srm["flag"]:
        lines += [
            f"**Sample-ratio mismatch (p = {_f(srm['p_value'])} < {srm['threshold']:g}): the "
            "arm sizes do not match the configured split. Do not trust these results; find "
            "where users were lost or duplicated first.**",
            "",
        ]
    lines += ["| arm | verdict |", "|---|---|"]
    lines += [f"| {a} | {v} |" for a, v in report["verdicts"].items()]
    lines += ["", "## Arms", "", *_table(arm_rows(report))]
    lines += [
        "",
        "## Sample-ratio check",
        "",
        f"Chi-square = {_f(srm['chi2'])}, p = {_f(srm['p_value'])} "
        f"({'MISMATCH' if srm['flag'] else 'no mismatch'} at p < {srm['threshold']:g}).",
        "",
    ]
    lines += _table(
        [
            {"arm": a, "users": srm["counts"][a], "expected": srm["expected"][a]}
            for a in srm["counts"]
        ]
    )
    lines += ["", "## Differences vs control", "", *_table(summary_rows(report))]
    lines += [
        "",
        "## CUPED",
        "",
        "Covariate: the metric of the same user in the pre-period "
        "(static model). Variance reduction = 1 - Var(adjusted) / Var(raw), within arms.",
        "",
    ]
    lines += _table(
        [
            {
                "metric": m,
                "users with covariate": c["n_with_covariate"],
                "corr": _f(c["corr"]),
                "theta": _f(c["theta"]),
                "variance reduction": _pct(c["variance_reduction"]).lstrip("+"),
                "used": _f(c["used"]),
            }
            for m, c in report["cuped"].items()
        ]
    )
    lines += ["", "## Sequential test (mSPRT, valid under daily peeking)", ""]
    seq_rows = []
    for metric, per_arm in report["comparisons"].items():
        for arm, r in per_arm.items():
            s = r["sequential"]
            if not s or s.get("tau") is None:
                continue
            seq_rows.append(
                {
                    "metric": metric,
                    "arm": arm,
                    "tau": _f(s["tau"]),
                    "last-day CS": f"[{_f(s['cs_low'][-1])}, {_f(s['cs_high'][-1])}]",
                    "always-valid p": _f(s["p_value"]),
                    "rejected on day": _f(s["first_reject_day"]),
                }
            )
    lines += _table(seq_rows) if seq_rows else ["(no per-day data)"]
    lines += ["", "## Power", ""]
    lines += _table(
        [
            {
                "metric": metric,
                "arm": arm,
                "sd (adjusted)": _f(r["power"]["sd"]),
                "MDE (abs)": _f(r["power"]["mde"]),
                "MDE (rel)": _pct(r["power"]["mde_rel"]),
                "power at +5 %": _f(r["power"]["power_at_ref_lift"]),
            }
            for metric, per_arm in report["comparisons"].items()
            for arm, r in per_arm.items()
        ]
    )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_f(r[c]) for c in cols) + " |" for r in rows]
    return out


def write_report(out: str | Path, report: dict, plots: list[str]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    js.write_text(json.dumps({**report, "plots": plots}, indent=2) + "\n", encoding="utf-8")
    md.write_text(render_markdown(report, plots), encoding="utf-8")
    return js, md
