"""The replay report: per-policy figures, the goal checks, ``results.json``, ``results.md``
and ``report.html`` (the same tables and the PNG plots in one self-contained page).

Every number printed or written comes from :func:`summarise` (one dict), so the JSON
holds every printed figure. Quality is event-averaged over the evaluated events (HR@10,
NDCG@10, MRR@10) and user-averaged for UAUC; the NDCG@10 difference to the static
model gets a 95 % percentile bootstrap CI over USERS (``scipy.stats.bootstrap``,
paired per user, seeded), since one user's events are correlated.

``per_user.json`` (:func:`per_user_figures`) holds, per policy, the replayed users'
ids and their per-user mean NDCG@10 and event counts, with what identifies the stream,
so runs of other artefacts can be paired user by user later
(:mod:`recsys.replay.compare`).

Example::

    summary = summarise(run)
    write_report(summary, Path("results/replay-ml-100k"), per_user_figures(run))
    print_report(summary)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from recsys.errors import ValidationError
from recsys.metrics import user_bootstrap_ci
from recsys.replay.config import PolicySpec
from recsys.replay.engine import ReplayRun
from recsys.replay.records import EventRecords
from recsys.report_html import Block, Bullets, Heading, Image, Table, Text, write_html
from recsys.reporting import strict_json

logger = logging.getLogger(__name__)

GOALS = {
    "system_vs_static_rel": 0.05,  # system at 100 % >= +5 % relative NDCG@10 over static
    "system_vs_finetune_compute": 0.01,  # ... at < 1 % of fine-tuning's device compute
    "budget10_gain_kept": 0.98,  # system at 10 % keeps >= 98 % of the 100 % gain
}


def _aligned(a: EventRecords, b: EventRecords) -> None:
    if not (
        np.array_equal(a.user, b.user)
        and np.array_equal(a.item, b.item)
        and np.array_equal(a.timestamp, b.timestamp)
    ):
        raise ValidationError("policies were not replayed on the same events; cannot compare")


def over_time(records: Mapping[str, EventRecords], bins: int = 20) -> dict[str, Any]:
    """NDCG@10 per policy in ``bins`` equal-count bins of the evaluated events in time order.

    Returns:
        {"t_start" [K], "t_end" [K], "events" [K], "ndcg@10": {label: [K]}}.
    """
    first = next(iter(records.values()))
    n = len(first)
    k = max(1, min(bins, n // 50 if n >= 100 else 1))
    edges = np.linspace(0, n, k + 1).astype(int)
    out: dict[str, Any] = {
        "t_start": [int(first.timestamp[a]) for a in edges[:-1]],
        "t_end": [int(first.timestamp[b - 1]) for b in edges[1:]],
        "events": np.diff(edges).tolist(),
        "ndcg@10": {},
    }
    for label, rec in records.items():
        v = rec.ndcg10()
        out["ndcg@10"][label] = [float(v[a:b].mean()) for a, b in itertools.pairwise(edges)]
    return out


def _find(
    specs: list[PolicySpec], kind: str, trigger: str | None = None, budget: float | None = None
):
    for s in specs:
        if s.kind != kind or (trigger and s.trigger != trigger):
            continue
        if budget is None or abs(s.budget - budget) < 1e-9:
            return s.label
    return None


def _vs_finetune(s: Mapping[str, Any], f: Mapping[str, Any]) -> dict[str, Any]:
    """A system policy ``s`` against fine-tuning ``f``: quality and device-compute ratios."""

    def ratio(key: str) -> float | None:
        return s[key] / f[key] if f[key] else None

    time_ratio, flop_ratio = ratio("device_us_per_event"), ratio("device_flops_per_event")
    at_least = bool(s["ndcg@10"] >= f["ndcg@10"])
    limit = GOALS["system_vs_finetune_compute"]
    return {
        "ndcg@10_system": s["ndcg@10"],
        "ndcg@10_finetune": f["ndcg@10"],
        "system_at_least_as_good": at_least,
        "device_time_ratio": time_ratio,
        "device_flops_ratio": flop_ratio,
        "met": bool(at_least and time_ratio is not None and time_ratio < limit),
        "met_by_flops": bool(at_least and flop_ratio is not None and flop_ratio < limit),
    }


def goal_checks(policies: Mapping[str, dict], specs: list[PolicySpec]) -> dict[str, Any]:
    """The issue's three target figures, measured (None when a policy is missing)."""
    static = _find(specs, "static")
    full = _find(specs, "system", "gate", 1.0)
    ten = _find(specs, "system", "gate", 0.1)
    ft = _find(specs, "finetune")
    out: dict[str, Any] = {
        "targets": GOALS,
        "policies": {"static": static, "system 100%": full, "system 10%": ten, "finetune": ft},
    }
    if static and full:
        rel = policies[full]["ndcg@10_rel_to_static"]
        out["system_vs_static_rel"] = {
            "value": rel,
            "met": bool(rel >= GOALS["system_vs_static_rel"]),
        }
    if full and ft:
        out["system_vs_finetune"] = _vs_finetune(policies[full], policies[ft])
        out["system_vs_finetune_by_policy"] = {
            s.label: _vs_finetune(policies[s.label], policies[ft])
            for s in specs
            if s.kind == "system"
        }
    if static and full and ten:
        g_full = policies[full]["ndcg@10"] - policies[static]["ndcg@10"]
        g_ten = policies[ten]["ndcg@10"] - policies[static]["ndcg@10"]
        kept = g_ten / g_full if g_full > 0 else None
        out["budget10_gain_kept"] = {
            "value": kept,
            "gain_100": g_full,
            "gain_10": g_ten,
            "met": bool(kept is not None and kept >= GOALS["budget10_gain_kept"]),
        }
    return out


LATE_SHARE = 1 / 3  # "late in the replay period": the last third of its events by time


def comparison_pairs(specs: list[PolicySpec]) -> list[tuple[str, str]]:
    """(policy, reference) pairs the report compares with paired CIs: every system
    variant against fine-tuning and against DUET at the same trigger and budget (else
    DUET's largest budget); live / continual against the frozen system / the plain
    adaptor edit at the same trigger and budget."""
    by_label = {s.label: s for s in specs}
    ft = _find(specs, "finetune")
    duets = [s for s in specs if s.kind == "duet"]
    pairs = []
    for s in specs:
        if s.kind not in ("system", "duet"):
            continue
        extra = trigger_pairs(s, specs)
        pairs += extra
        if s.kind != "system" or extra:  # learned / guarded: their own references only
            continue
        if ft:
            pairs.append((s.label, ft))
        same = [d for d in duets if d.trigger == s.trigger and abs(d.budget - s.budget) < 1e-9]
        if same or duets:
            pairs.append((s.label, (same or sorted(duets, key=lambda d: -d.budget))[0].label))
        twin = {"system-live": "system", "system-continual": "system-noproto"}.get(s.edit_kind)
        if twin:
            for o in by_label.values():
                if (
                    o.edit_kind == twin
                    and o.trigger == s.trigger
                    and abs(o.budget - s.budget) < 1e-9
                ):
                    pairs.append((s.label, o.label))
    return pairs


def _same(a: PolicySpec, b: PolicySpec, **fields: Any) -> bool:
    """Same edit kind and budget, and ``fields`` equal in ``b``."""
    return (
        a.edit_kind == b.edit_kind
        and abs(a.budget - b.budget) < 1e-9
        and all(getattr(b, k) == v for k, v in fields.items())
    )


def trigger_pairs(s: PolicySpec, specs: list[PolicySpec]) -> list[tuple[str, str]]:
    """The learned gate against the timer and the shift gate at the same budget; a
    guarded policy against its unguarded twin and against static."""
    out = []
    if s.guard:
        out += [(s.label, o.label) for o in specs if _same(s, o, trigger=s.trigger, guard=False)]
        static = _find(specs, "static")
        if static:
            out.append((s.label, static))
    elif s.trigger == "learned" and s.budget < 1.0:
        for trig in ("timer", "gate"):
            out += [(s.label, o.label) for o in specs if _same(s, o, trigger=trig, guard=False)]
    return out


def learned_goals(policies: Mapping[str, dict], specs: list[PolicySpec]) -> dict[str, Any]:
    """Issue 15's learned-gate figures: per trigger and budget, the share of the 100 %
    budget's NDCG@10 gain over static that it keeps (target >= 98 % at 10 %)."""
    static = _find(specs, "static")
    full = next(
        (s.label for s in specs if s.kind == "system" and s.budget >= 1.0 and not s.guard), None
    )
    if not static or not full:
        return {}
    g_full = policies[full]["ndcg@10"] - policies[static]["ndcg@10"]
    out = {"reference": full, "gain_100": g_full, "kept": {}}
    for s in specs:
        if s.kind == "system" and s.budget < 1.0 and not s.guard and s.edit_kind == "system":
            gain = policies[s.label]["ndcg@10"] - policies[static]["ndcg@10"]
            out["kept"][s.label] = gain / g_full if g_full > 0 else None
    return out


def guard_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per guarded policy: edits applied and kept out, and the check's device time."""

    def row(label: str, p: Mapping[str, Any]) -> dict[str, Any]:
        n = p["guard_accepted"] + p["guard_rejected"]
        return {
            "policy": label,
            "edits": n,
            "applied": p["guard_accepted"],
            "kept out": p["guard_rejected"],
            "kept out %": f"{100 * p['guard_rejected'] / max(n, 1):.1f}%",
            "check us/edit p50": f"{p['guard_us_per_edit_p50']:.2f}",
            "check us/edit mean": f"{p['guard_us_per_edit_mean']:.2f}",
        }

    return _rows_with(summary, "guard_accepted", row)


def fleet_evidence_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per fleet-guarded policy, what its pooled evidence could tell, in hindsight
    (:func:`recsys.replay.guard.fleet_evidence_figures`): the clicks n* = (sd / mean)^2
    the pooled mean needs to stand one standard error from zero, and the share of
    requests the guard applied before and after that point."""

    def pct(x: float) -> str:
        return "-" if not np.isfinite(x) else f"{100 * x:.0f}%"

    def row(label: str, f: Mapping[str, Any]) -> dict[str, Any]:
        n_sign = f["clicks_to_sign"]
        return {
            "policy": label,
            "clicks": f"{f['clicks']:,}",
            "gain/click": f"{f['gain_per_click']:+.5f}",
            "sd/click": f"{f['sd_per_click']:.4f}",
            "n* = (sd/gain)^2": "-" if not np.isfinite(n_sign) else f"{n_sign:,.0f}",
            "n* share of clicks": pct(f["sign_share"]),
            "applied before n*": f"{pct(f['applied_before'])} of {f['requests_before']:,}",
            "applied after n*": f"{pct(f['applied_after'])} of {f['requests_after']:,}",
        }

    figures = summary["meta"].get("fleet_evidence") or {}
    return [row(label, figures[label]) for label in summary["order"] if label in figures]


def learned_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per system policy below a 100 % budget: the share of the 100 % gain it keeps."""
    g = summary.get("learned", {})
    return [
        {
            "policy": label,
            "request rate": f"{100 * summary['policies'][label]['request_rate']:.1f}%",
            f"gain kept (of {g['reference']}, +{g['gain_100']:.4f})": "-"
            if kept is None
            else f"{100 * kept:.1f}%",
        }
        for label, kept in g.get("kept", {}).items()
    ]


def comparisons(
    records: Mapping[str, EventRecords], pairs: list[tuple[str, str]], seed: int, resamples: int
) -> list[dict[str, Any]]:
    """Paired NDCG@10 differences with user-bootstrap 95 % CIs, over the whole replay
    period and over its late part (the last ``LATE_SHARE`` of the events by time)."""
    out = []
    for a, b in pairs:
        ra, rb = records[a], records[b]
        _aligned(ra, rb)
        diff = ra.ndcg10() - rb.ndcg10()
        cut = np.quantile(ra.timestamp, 1 - LATE_SHARE) if len(ra) else 0
        late = ra.timestamp >= cut
        out.append(
            {
                "policy": a,
                "reference": b,
                "diff": float(diff.mean()) if len(diff) else 0.0,
                "ci95": user_bootstrap_ci(diff, ra.user, seed, resamples),
                "late_diff": float(diff[late].mean()) if late.any() else 0.0,
                "late_ci95": user_bootstrap_ci(diff[late], ra.user[late], seed, resamples),
                "late_from": int(cut),
            }
        )
    return out


def comparison_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "policy": c["policy"],
            "minus": c["reference"],
            "NDCG@10 diff": f"{c['diff']:+.4f}",
            "95% CI": f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]",
            "late third diff": f"{c['late_diff']:+.4f}",
            "late 95% CI": f"[{c['late_ci95'][0]:+.4f}, {c['late_ci95'][1]:+.4f}]",
        }
        for c in summary.get("comparisons", [])
    ]


def global_time_lines(summary: Mapping[str, Any]) -> list[str]:
    """The shared cloud of a global-time replay: requests, slices, versions, store, learning."""
    g = summary["meta"].get("global_time")
    if not g:
        return []
    ev = max(summary["policies"][summary["order"][0]]["events"], 1)
    out = [
        f"order {g['order']}; {g['slices']:,} slices of "
        + (f"{g['slice_s']:,.4g} s" if g["slice_s"] else "one request")
        + "; requests "
        + ", ".join(f"{k} {v:,}" for k, v in g["requests"].items())
        + f"; cloud CPU {g['seconds']:.1f} s in all"
    ]
    for label, sec in g["cloud_seconds"].items():
        n = g["requests"].get(label, 0)
        if n:
            out.append(
                f"{label}: cloud {1e3 * sec / n:.2f} ms per edit, {1e3 * sec / ev:.2f} ms per "
                "evaluated event (tokens, summary, generation, residual, encoding; store "
                "writes and learner refreshes not included)"
            )
        p = g.get("policies", {}).get(label, {})
        if "versions_written" in p:
            out.append(
                f"  its prototype bank: {p['versions_written']:,} versions written "
                f"({p['refinements']:,} refinements, {p['spawned']} spawned), "
                f"{p['prototypes']} prototypes at the end"
            )
        if "refreshes" in p:
            out.append(
                f"  its adaptor: {p['examples']:,} uplinked examples, {p['refreshes']} "
                f"refreshes (every {g['refresh_interval_s']:,.4g} s) of "
                f"{p['refresh_ms_mean']:.0f} ms each on average, {p['accepted']} kept "
                "(higher NDCG@10 on the held-out devices' examples)"
            )
    if "store" in g:
        st = g["store"]
        sec = st.get("write_seconds")
        timing = (
            f" in {sec:.2f} s ({st['writes_per_s']:,.0f} writes/s)"
            if sec and st.get("writes_per_s") and sec == sec
            else " (timed inside the cloud server)"
        )
        out.append(f"store ({g.get('store_backend', '?')}): {st['writes']:,} writes{timing}")
    return out


def summarise(run: ReplayRun, bins: int = 20) -> dict[str, Any]:
    """Every figure of the report (quality, CIs, costs, gate rates, goals, over time)."""
    specs = [PolicySpec.from_dict(p) for p in run.meta["policies"]]
    labels = [s.label for s in specs]
    static = _find(specs, "static")
    seed = int(run.meta["seed"])
    resamples = int(run.meta["config"].get("bootstrap", 2000))
    ref = run.records[static] if static else None
    policies: dict[str, dict[str, Any]] = {}
    for s in specs:
        rec = run.records[s.label]
        row: dict[str, Any] = {"kind": s.kind, "trigger": s.trigger if s.requests else None}
        row["budget"] = (
            s.budget
            if s.kind in ("system", "duet")
            else (1.0 / s.finetune_every if s.kind == "finetune" else 0.0)
        )
        row |= rec.summary()
        if ref is not None:
            _aligned(ref, rec)
            diff = rec.ndcg10() - ref.ndcg10()
            base = float(ref.ndcg10().mean())
            row["ndcg@10_diff_to_static"] = float(diff.mean())
            row["ndcg@10_rel_to_static"] = float(diff.mean()) / base if base else float("nan")
            row["ndcg@10_diff_ci95"] = (
                [0.0, 0.0]
                if s.label == static
                else user_bootstrap_ci(diff, rec.user, seed, resamples)
            )
        row |= run.costs[s.label]
        # every request (a device's first one too) per evaluated event; the rate of
        # requests triggered BY evaluated events (first requests excluded) stays beside it
        row["triggered_rate"] = row["request_rate"]
        row["request_rate"] = row["requests"] / row["events"] if row["events"] else 0.0
        gate = run.meta.get("gate", {}).get(s.label)
        if gate:
            row["gate_threshold"] = gate["threshold"]
            row["gate_train_rate"] = gate["train_rate"]
        policies[s.label] = row
    return {
        "meta": run.meta,
        "policies": policies,
        "order": labels,
        "comparisons": comparisons(run.records, comparison_pairs(specs), seed, resamples),
        "goals": goal_checks(policies, specs),
        "learned": learned_goals(policies, specs),
        "over_time": over_time({k: run.records[k] for k in labels}, bins),
    }


def quality_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label in summary["order"]:
        p = summary["policies"][label]
        ci = p.get("ndcg@10_diff_ci95")
        rows.append(
            {
                "policy": label,
                "events": p["events"],
                "hr@10": p["hr@10"],
                "ndcg@10": p["ndcg@10"],
                "mrr@10": p["mrr@10"],
                "vs static": f"{100 * p['ndcg@10_rel_to_static']:+.1f}%"
                if "ndcg@10_rel_to_static" in p
                else "-",
                "diff 95% CI": "-"
                if not ci or p["kind"] == "static"
                else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]",
                "uauc": p["uauc"],
                "budget": "-" if p["kind"] == "static" else f"{100 * p['budget']:g}%",
                "request rate": "-" if p["kind"] == "static" else f"{100 * p['request_rate']:.1f}%",
            }
        )
    return rows


def cost_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label in summary["order"]:
        p = summary["policies"][label]
        rows.append(
            {
                "policy": label,
                "requests": p["requests"],
                "device us/event": p["device_us_per_event"],
                "decode+apply us/req (p50)": "-"
                if not p["requests"]
                else f"{p['device_decode_us_per_request_p50']:.0f}+"
                f"{p['device_apply_us_per_request_p50']:.0f}",
                "device FLOPs/event": f"{p['device_flops_per_event']:.3g}",
                "device peak KiB": f"{p['device_peak_bytes_max'] / 1024:.1f}",
                "up B/req": round(p["uplink_bytes_per_request"]),
                "down B/req": round(p["downlink_bytes_per_request"]),
                "up MB": f"{p['uplink_bytes_total'] / 1e6:.2f}",
                "down MB": f"{p['downlink_bytes_total'] / 1e6:.2f}",
                "cloud ms/req": p["cloud_ms_per_request_mean"],
            }
        )
    return rows


def _rows_with(
    summary: Mapping[str, Any], key: str, row: Callable[[str, Mapping[str, Any]], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``row(label, figures)`` of every policy (in order) whose figures have ``key``."""
    policies = summary["policies"]
    return [row(label, policies[label]) for label in summary["order"] if key in policies[label]]


def service_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per policy, what a run through the services measured (none for an in-process run):
    edit requests, failures, fallback answers, bytes per request, round-trip latencies."""

    def row(label: str, p: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "policy": label,
            "requests": p["requests"],
            "failed": p["failed_requests"],
            "fallback answers": p["fallback_answers"],
            "up B/req": round(p["uplink_bytes_per_request"]),
            "down B/req": round(p["downlink_bytes_per_request"]),
            "Recommend ms p50 / p99": f"{p['recommend_ms_p50']:.2f} / {p['recommend_ms_p99']:.2f}",
            "RecordEvent ms p50 / p99": f"{p['record_event_ms_p50']:.2f} / "
            f"{p['record_event_ms_p99']:.2f}",
        }

    return _rows_with(summary, "recommend_ms_p50", row)


def goal_lines(summary: Mapping[str, Any]) -> list[str]:
    """Plain sentences: each target, the measured value, met or not."""
    g = summary["goals"]
    names = g["policies"]
    out = []
    if "system_vs_static_rel" in g:
        v = g["system_vs_static_rel"]
        out.append(
            f"{names['system 100%']} vs {names['static']}: {100 * v['value']:+.1f}% NDCG@10 "
            f"(target >= +5%): {'met' if v['met'] else 'NOT met'}"
        )
    if "system_vs_finetune" in g:
        v = g["system_vs_finetune"]
        tr = v["device_time_ratio"]
        fr = v["device_flops_ratio"]
        out.append(
            f"{names['system 100%']} vs {names['finetune']}: NDCG@10 {v['ndcg@10_system']:.4f} vs "
            f"{v['ndcg@10_finetune']:.4f} ({'at least as good' if v['system_at_least_as_good'] else 'worse'}); "
            f"device time {100 * tr:.2f}% and FLOPs {100 * fr:.2f}% of fine-tuning's per event "
            f"(target < 1%): {'met' if v['met'] else 'NOT met'} by time, "
            f"{'met' if v['met_by_flops'] else 'NOT met'} by FLOPs"
            if tr is not None and fr is not None
            else f"{names['finetune']} has no device cost recorded"
        )
    for label, v in g.get("system_vs_finetune_by_policy", {}).items():
        if label == names["system 100%"] or v["device_time_ratio"] is None or "gate" not in label:
            continue
        out.append(
            f"  {label}: NDCG@10 {v['ndcg@10_system']:.4f}, device time "
            f"{100 * v['device_time_ratio']:.2f}% / FLOPs {100 * v['device_flops_ratio']:.2f}% "
            f"of {names['finetune']}'s per event"
        )
    if "budget10_gain_kept" in g:
        v = g["budget10_gain_kept"]
        kept = "n/a (no gain at 100%)" if v["value"] is None else f"{100 * v['value']:.1f}%"
        out.append(
            f"{names['system 10%']} keeps {kept} of the 100%-budget NDCG@10 gain "
            f"({v['gain_10']:+.4f} of {v['gain_100']:+.4f}; target >= 98%): "
            f"{'met' if v['met'] else 'NOT met'}"
        )
    return out


def bullets(lines: list[str]) -> list[str]:
    """Markdown bullets; lines starting with two spaces become sub-bullets."""
    return [f"  - {x.strip()}" if x.startswith("  ") else f"- {x}" for x in lines]


def header_line(summary: Mapping[str, Any]) -> str:
    m = summary["meta"]
    st, sp = m["stream"], m["split"]
    return (
        f"{m['dataset']['name']} replay period (time split q={sp['quantile']}, cut "
        f"{sp['cut_timestamp']}): {st['evaluated_events']:,} events of {st['evaluated_users']} "
        f"users evaluated ({st['evaluated_cold_user_events']:,} from users with < 5 training "
        f"events), {st['skipped_events_short_history']:,} skipped (history < {st['min_history']}); "
        f"tokens: {m['token_source']}; payload {m['config']['payload_dtype']}; prototypes "
        f"{'frozen except system-live' if m.get('global_time') else 'frozen'}; "
        f"seed {m['seed']}; {m['config']['workers']} worker(s)"
    )


def gate_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per gate policy: budget, calibrated threshold, training-period and replay rates."""

    def row(label: str, p: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "policy": label,
            "budget": f"{100 * p['budget']:g}%",
            "threshold": f"{p['gate_threshold']:.5f}",
            "training-period rate": f"{100 * p['gate_train_rate']:.1f}%",
            "replay: requests / event": f"{100 * p['request_rate']:.1f}%",
            "replay: triggered by an event": f"{100 * p['triggered_rate']:.1f}%",
        }

    return _rows_with(summary, "gate_threshold", row)


def report_tables(summary: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The report's tables, (title, rows), in order; empty ones left out."""
    tables = (
        ("Quality (full-catalogue ranking, seen items excluded)", quality_rows(summary)),
        ("Paired differences (user-bootstrap 95% CIs)", comparison_rows(summary)),
        ("Cost per policy", cost_rows(summary)),
        ("Through the services", service_rows(summary)),
        ("Request gate: threshold calibrated on the training period", gate_rows(summary)),
        ("Share of the 100 % budget's gain kept", learned_rows(summary)),
        ("Harm guard: edits applied or kept out", guard_rows(summary)),
        (
            "Fleet guard: what the pooled evidence could tell (hindsight)",
            fleet_evidence_rows(summary),
        ),
    )
    return [(title, rows) for title, rows in tables if rows]


def report_title(summary: Mapping[str, Any]) -> str:
    return f"Replay: {summary['meta']['dataset']['name']}"


def markdown(summary: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """``results.md``: header, tables, goal checks, plots."""
    lines = [f"# {report_title(summary)}", "", header_line(summary), ""]
    for title, rows in report_tables(summary):
        lines += [f"## {title}", "", *_md_table(rows), ""]
    if global_time_lines(summary):
        lines += ["## The shared cloud (global time)", "", *bullets(global_time_lines(summary)), ""]
    lines += ["## Targets (as measured)", "", *bullets(goal_lines(summary)), ""]
    for name, file in plots.items():
        lines += [f"![{name}]({file})", ""]
    return "\n".join(lines)


def html_blocks(summary: Mapping[str, Any], plots: Mapping[str, Path]) -> list[Block]:
    """``report.html``'s content: the same header, tables, goal checks and plots as
    :func:`markdown` (``plots``: name -> PNG path, embedded)."""
    blocks: list[Block] = [Text(header_line(summary))]
    for title, rows in report_tables(summary):
        blocks += [Heading(title), Table(rows)]
    if global_time_lines(summary):
        blocks += [Heading("The shared cloud (global time)"), Bullets(global_time_lines(summary))]
    blocks += [Heading("Targets (as measured)"), Bullets(goal_lines(summary))]
    if plots:
        blocks += [Heading("Plots"), *(Image(path, name) for name, path in plots.items())]
    return blocks


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    cols = list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return out


PER_USER_FORMAT = "recsys.replay.per_user.v1"
PER_USER_FILE = "per_user.json"


def events_digest(rec: EventRecords) -> str:
    """sha256 of a policy's evaluated events (user, item, timestamp in their sorted
    order): two replays with equal digests scored the same events."""
    h = hashlib.sha256()
    for a in (rec.user, rec.item, rec.timestamp):
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()


def per_user_figures(run: ReplayRun, metric: str = "ndcg@10") -> dict[str, Any]:
    """What ``per_user.json`` holds: per policy the evaluated users (dataset user
    indices, ascending), their mean ``metric`` and event counts, and the events' digest;
    with the dataset, seed, stream, replayed users, config and artefact of the run, so
    replays of other artefacts can be paired user by user (:mod:`recsys.replay.compare`).
    The event-weighted mean of the per-user means is the policy's ``results.json``
    figure."""
    m = run.meta
    policies = {}
    for label, rec in run.records.items():
        users, means, counts = rec.per_user_mean(metric)
        policies[label] = {
            "users": users.tolist(),
            metric: means.tolist(),
            "events": counts.tolist(),
            "events_sha256": events_digest(rec),
        }
    return {
        "format": PER_USER_FORMAT,
        "metric": metric,
        "dataset": m["dataset"],
        "seed": m["seed"],
        "stream": m["stream"],
        "replayed_users": m["replayed_users"],
        "config": m["config"],
        "artifact": m["artifact"],
        "token_source": m["token_source"],
        "lm_dir": m.get("lm_dir"),
        "via": m.get("via"),
        "order": [p["label"] for p in m["policies"]],
        "specs": m["policies"],
        "policies": policies,
    }


def write_report(
    summary: Mapping[str, Any], out: Path, per_user: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, the PNG plots and ``report.html`` (the
    same tables and the plots in one self-contained page, :mod:`recsys.report_html`) into
    ``out``, and ``per_user.json`` when ``per_user`` (:func:`per_user_figures`) is given."""
    from recsys.replay.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(summary, out)
    payload = dict(summary) | {"plots": {k: p.name for k, p in plots.items()}}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    (out / "results.md").write_text(markdown(summary, {k: p.name for k, p in plots.items()}))
    html = write_html(out / "report.html", report_title(summary), html_blocks(summary, plots))
    paths = {"json": out / "results.json", "md": out / "results.md", "html": html, **plots}
    if per_user is not None:
        dest = out / PER_USER_FILE
        dest.write_text(json.dumps(strict_json(per_user), allow_nan=False) + "\n")
        paths["per_user"] = dest
    return paths


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
