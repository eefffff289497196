"""Write the analysis: ``report.json`` (every number), ``report.md`` (verdicts, tables,
plots) and ``report.html`` (the same blocks, :func:`blocks`, with the plots embedded in one
self-contained page). The rows printed by ``recsys abtest analyze`` come from :func:`summary_rows`, so the
terminal, the Markdown and the JSON show the same figures.

Example::

    write_report(out_dir, report, plots=["effects.png", "sequential.png"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recsys.report_html import Block, Heading, Image, Table, Text, write_html
from recsys.report_html import render_markdown as _md

HTML_FILE = "report.html"


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


def report_title(report: dict) -> str:
    return f"A/B test report: {report['experiment']['name']}"


def blocks(report: dict, plots: Sequence[str | Path]) -> list[Block]:
    """The report's content (verdicts, tables, plots) for the Markdown and the HTML page;
    ``plots``: PNG files (the Markdown links their names, the HTML embeds them)."""
    exp = report["experiment"]
    conf = 1 - exp["analysis"]["alpha"]
    srm = report["srm"]
    out: list[Block] = [Text(exp["description"])] if exp.get("description") else []
    out += [
        Text(
            f"Control arm: `{exp['control']}`. Primary metric: `{exp['primary_metric']}`; "
            f"guardrails: {', '.join(f'`{g}`' for g in exp['guardrail_metrics']) or 'none'}; "
            f"secondary: {', '.join(f'`{g}`' for g in exp['secondary_metrics']) or 'none'}. "
            f"{report['users']:,} exposed users over {report['days']} day(s). Intervals are "
            f"{100 * conf:g} %; p-values across treatment arms are Holm-corrected per metric. "
            "Verdicts use the fixed-horizon test (CUPED-adjusted Welch when a covariate exists) "
            "and are valid once, at the planned end; to stop early while the experiment runs, "
            "use only the sequential (mSPRT) p-value, which stays valid under daily peeking."
        ),
        Heading("Verdict"),
    ]
    if srm["flag"]:
        out.append(
            Text(
                f"**Sample-ratio mismatch (p = {_f(srm['p_value'])} < {srm['threshold']:g}): the "
                "arm sizes do not match the configured split. Do not trust these results; find "
                "where users were lost or duplicated first.**"
            )
        )
    out += [
        Table([{"arm": a, "verdict": v} for a, v in report["verdicts"].items()], fmt=_f),
        Heading("Arms"),
        Table(arm_rows(report), fmt=_f),
        Heading("Sample-ratio check"),
        Text(
            f"Chi-square = {_f(srm['chi2'])}, p = {_f(srm['p_value'])} "
            f"({'MISMATCH' if srm['flag'] else 'no mismatch'} at p < {srm['threshold']:g})."
        ),
        Table(
            [
                {"arm": a, "users": srm["counts"][a], "expected": srm["expected"][a]}
                for a in srm["counts"]
            ],
            fmt=_f,
        ),
        Heading("Differences vs control"),
        Table(summary_rows(report), fmt=_f),
        Heading("CUPED"),
        Text(
            "Covariate: the metric of the same user in the pre-period "
            "(static model). Variance reduction = 1 - Var(adjusted) / Var(raw), within arms."
        ),
        Table(
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
            ],
            fmt=_f,
        ),
        Heading("Sequential test (mSPRT, valid under daily peeking)"),
    ]
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
    out.append(Table(seq_rows, fmt=_f) if seq_rows else Text("(no per-day data)"))
    out += [
        Heading("Power"),
        Table(
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
            ],
            fmt=_f,
        ),
    ]
    if plots:
        out += [Heading("Plots"), *(Image(Path(p), Path(p).name) for p in plots)]
    return out


def render_markdown(report: dict, plots: list[str]) -> str:
    """The Markdown report (:func:`blocks`; plots linked by file name)."""
    return _md(report_title(report), blocks(report, plots))


def write_report(out: str | Path, report: dict, plots: list[str]) -> tuple[Path, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` (the same content with the
    plots embedded: one self-contained page, :mod:`recsys.report_html`) into ``out``;
    ``plots`` are PNG file names in ``out``. Returns the JSON and Markdown paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    js.write_text(json.dumps({**report, "plots": plots}, indent=2) + "\n", encoding="utf-8")
    md.write_text(render_markdown(report, plots), encoding="utf-8")
    write_html(out / HTML_FILE, report_title(report), blocks(report, [out / p for p in plots]))
    return js, md
