"""``recsys replay compare``: one policy across several replays, paired user by user.

An ablation replays the same stream once per adaptor artefact (e.g. tokens from a
pretrained LLM, from the from-scratch LM, the items' own IDs, no tokens), each run
writing ``OUT/per_user.json`` (:func:`recsys.replay.report.per_user_figures`). This
module loads those runs, checks that they replayed the same users on the same stream
(dataset fingerprint, seed, stream summary, replayed users, config, and the digest of
every scored event), and compares one policy across them:

* **arms**: each run's policy (named by the run's label), plus reference arms taken from
  any run as ``POLICY@RUN`` (e.g. ``duet@scratch``: that run's DUET policy; a policy is
  named by its label, or by its kind / edit kind, which picks the policy of that kind
  with the compared policy's trigger and budget, else the only one);
* per arm the event-averaged NDCG@10 (= the run's ``results.json`` figure);
* per (arm, reference) the NDCG@10 difference with a paired user-bootstrap 95 % CI:
  :func:`recsys.metrics.user_bootstrap_ci`, the helper the replay report's own
  comparisons use, on the per-user differences weighted by the users' event counts
  (the same estimator: the events of a user move together).

Example::

    runs = [load_run("pretrained", Path("results/abl-pretrained")),
            load_run("scratch", Path("results/abl-scratch"))]
    res = compare_runs(runs, "system gate 20%", ["scratch", "duet@scratch"])
    res["comparisons"][0]["diff"], res["comparisons"][0]["ci95"]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.errors import NotFoundError, ValidationError
from recsys.metrics import user_bootstrap_ci
from recsys.replay.config import PolicySpec
from recsys.replay.report import PER_USER_FILE, PER_USER_FORMAT

# config fields that may differ between the runs of one comparison: where the adaptor
# came from (the point of the ablation) and how the work was split
CONFIG_MAY_DIFFER = ("artifact", "workers", "ray", "store_url")
CONFIDENCE = 0.95


@dataclass
class LoadedRun:
    """One replay OUT directory: its ``per_user.json`` and (if present) ``results.json``."""

    label: str
    path: Path
    per_user: dict[str, Any]
    results: dict[str, Any] | None

    @property
    def policies(self) -> list[str]:
        return list(self.per_user["order"])

    def specs(self) -> list[PolicySpec]:
        return [PolicySpec.from_dict(d) for d in self.per_user["specs"]]


@dataclass
class Arm:
    """One compared arm: a run's policy and its per-user figures."""

    name: str  # as shown: the run label, or POLICY@RUN
    run: str
    policy: str  # the policy label in that run
    users: np.ndarray  # [U] dataset user indices, ascending
    means: np.ndarray  # [U] per-user mean NDCG@10
    events: np.ndarray  # [U] evaluated events per user
    digest: str

    @property
    def value(self) -> float:
        """Event-averaged NDCG@10."""
        n = self.events.sum()
        return float((self.means * self.events).sum() / n) if n else float("nan")


def parse_run(text: str) -> tuple[str, Path]:
    """``LABEL=DIR`` -> (label, dir)."""
    label, sep, path = text.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise ValidationError(
            f"--run takes LABEL=DIR (e.g. scratch=results/abl-scratch), got {text!r}"
        )
    if "@" in label:
        raise ValidationError(
            f"a run label must not contain '@' (it names POLICY@RUN arms): {label!r}"
        )
    return label.strip(), Path(path.strip()).expanduser()


def load_run(label: str, path: Path) -> LoadedRun:
    """The replay written to ``path`` by ``recsys replay --out``."""
    path = Path(path)
    file = path / PER_USER_FILE
    if not file.is_file():
        raise NotFoundError(
            f"{path} has no {PER_USER_FILE}: run `recsys replay --out {path} ...` (a replay "
            "written before per-user figures were saved must be run again)"
        )
    per_user = json.loads(file.read_text())
    if per_user.get("format") != PER_USER_FORMAT:
        raise ValidationError(
            f"{file} has format {per_user.get('format')!r}; expected {PER_USER_FORMAT!r}"
        )
    res = path / "results.json"
    results = json.loads(res.read_text()) if res.is_file() else None
    return LoadedRun(label=label, path=path, per_user=per_user, results=results)


def _kind_of(spec: PolicySpec) -> set[str]:
    return {spec.kind, spec.edit_kind or spec.kind}


def resolve_policy(run: LoadedRun, wanted: str, like: str | None = None) -> str:
    """The label in ``run`` of policy ``wanted``: an exact label, else a kind / edit kind
    ("duet", "static", "system-noproto", ...), preferring the trigger and budget of the
    policy labelled ``like`` when it names one of ``run``'s policies."""
    if wanted in run.policies:
        return wanted
    specs = run.specs()
    match = [s for s in specs if wanted in _kind_of(s)]
    if len(match) > 1 and like is not None:
        ref = next((s for s in specs if s.label == like), None)
        if ref is not None:
            same = [
                s for s in match if s.trigger == ref.trigger and abs(s.budget - ref.budget) < 1e-9
            ]
            match = same or match
    if len(match) == 1:
        return match[0].label
    if not match:
        raise ValidationError(
            f"run {run.label!r} ({run.path}) has no policy {wanted!r}; it replayed {run.policies}"
        )
    raise ValidationError(
        f"{wanted!r} names several policies of run {run.label!r}: "
        f"{[s.label for s in match]}; name one by its label, e.g. '{match[0].label}@{run.label}'"
    )


def _arm(name: str, run: LoadedRun, policy: str) -> Arm:
    fig = run.per_user["policies"][policy]
    metric = run.per_user["metric"]
    return Arm(
        name=name,
        run=run.label,
        policy=policy,
        users=np.asarray(fig["users"], dtype=np.int64),
        means=np.asarray(fig[metric], dtype=np.float64),
        events=np.asarray(fig["events"], dtype=np.int64),
        digest=str(fig["events_sha256"]),
    )


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} vs {b.get(k)!r}")
    return out


def check_runs(runs: Sequence[LoadedRun], *, allow_config_diff: bool = False) -> dict[str, Any]:
    """What the runs share (dataset, seed, stream, replayed users, config); a
    ValidationError naming the first run that differs, and how."""
    if len(runs) < 1:
        raise ValidationError("compare needs at least one --run LABEL=DIR")
    labels = [r.label for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValidationError(f"run labels must be unique, repeated: {dup}")
    first = runs[0]
    base = first.per_user
    config_diffs: dict[str, list[str]] = {}
    for run in runs[1:]:
        pu = run.per_user
        what = f"runs {first.label!r} ({first.path}) and {run.label!r} ({run.path})"
        if pu["dataset"].get("fingerprint") != base["dataset"].get("fingerprint") or pu[
            "dataset"
        ].get("name") != base["dataset"].get("name"):
            raise ValidationError(
                f"{what} replayed different datasets: {base['dataset'].get('name')} "
                f"{base['dataset'].get('fingerprint')} vs {pu['dataset'].get('name')} "
                f"{pu['dataset'].get('fingerprint')}"
            )
        if pu["seed"] != base["seed"]:
            raise ValidationError(f"{what} used different seeds: {base['seed']} vs {pu['seed']}")
        if pu["metric"] != base["metric"]:
            raise ValidationError(f"{what} saved different metrics")
        if pu["stream"] != base["stream"]:
            diff = "; ".join(_differences(base["stream"], pu["stream"]))
            raise ValidationError(f"{what} replayed different streams ({diff})")
        if pu["replayed_users"] != base["replayed_users"]:
            a, b = set(base["replayed_users"]), set(pu["replayed_users"])
            raise ValidationError(
                f"{what} replayed different users ({len(a - b)} only in the first, "
                f"{len(b - a)} only in the second)"
            )
        keep = [k for k in set(base["config"]) | set(pu["config"]) if k not in CONFIG_MAY_DIFFER]
        diffs = _differences(
            {k: base["config"].get(k) for k in keep}, {k: pu["config"].get(k) for k in keep}
        )
        if diffs:
            if not allow_config_diff:
                raise ValidationError(
                    f"{what} replayed with different settings ({'; '.join(diffs)}); replay "
                    "them alike, or pass --allow-config-diff"
                )
            config_diffs[run.label] = diffs
    return {
        "dataset": base["dataset"],
        "seed": base["seed"],
        "metric": base["metric"],
        "stream": base["stream"],
        "replayed_users": len(base["replayed_users"]),
        "config": {k: v for k, v in base["config"].items() if k not in CONFIG_MAY_DIFFER},
        "config_differences": config_diffs,
    }


def paired_difference(arm: Arm, ref: Arm, seed: int, resamples: int) -> dict[str, Any]:
    """NDCG@10 of ``arm`` minus ``ref`` over the same events, with the paired
    user-bootstrap 95 % CI (:func:`recsys.metrics.user_bootstrap_ci`)."""
    if not (np.array_equal(arm.users, ref.users) and np.array_equal(arm.events, ref.events)):
        raise ValidationError(
            f"{arm.name!r} and {ref.name!r} evaluated different users or event counts; "
            "cannot pair them"
        )
    if arm.digest != ref.digest:
        raise ValidationError(
            f"{arm.name!r} and {ref.name!r} scored different events (their event digests "
            "differ); replay both on the same stream"
        )
    diff_u = arm.means - ref.means  # [U]
    values = np.repeat(diff_u, arm.events)  # [E]: each event carries its user's difference
    users = np.repeat(arm.users, arm.events)  # [E]
    n = int(arm.events.sum())
    diff = float((diff_u * arm.events).sum() / n) if n else float("nan")
    base = ref.value
    ci = user_bootstrap_ci(values, users, seed, resamples, CONFIDENCE)
    return {
        "arm": arm.name,
        "reference": ref.name,
        "diff": diff,
        "rel": diff / base if base else float("nan"),
        "ci95": ci,
        "ci_excludes_zero": bool(ci[0] > 0 or ci[1] < 0),
        "users": len(arm.users),
        "events": n,
    }


def compare_runs(
    runs: Sequence[LoadedRun],
    policy: str,
    references: Sequence[str] = (),
    *,
    resamples: int | None = None,
    allow_config_diff: bool = False,
) -> dict[str, Any]:
    """Every figure of the comparison (see the module docstring).

    Args:
        runs: the loaded replays; each contributes its ``policy`` as the arm named by its
            label.
        policy: a policy label present in every run (e.g. "system gate 20%").
        references: run labels or ``POLICY@RUN`` arms to subtract (default: the first
            run); ``POLICY@RUN`` arms are added to the table.
        resamples: bootstrap resamples (default: the runs' ``bootstrap`` setting).
    """
    shared = check_runs(runs, allow_config_diff=allow_config_diff)
    by_label = {r.label: r for r in runs}
    arms: dict[str, Arm] = {}
    for run in runs:
        if policy not in run.policies:
            raise ValidationError(
                f"run {run.label!r} ({run.path}) has no policy {policy!r}; it replayed "
                f"{run.policies}"
            )
        arms[run.label] = _arm(run.label, run, policy)
    refs = list(references) or [runs[0].label]
    ref_names = []
    for ref in refs:
        if ref in arms:
            ref_names.append(ref)
            continue
        wanted, sep, run_label = ref.rpartition("@")
        if not sep:
            raise ValidationError(
                f"reference {ref!r} is neither a run label {list(by_label)} nor POLICY@RUN "
                "(e.g. duet@scratch, 'static@scratch')"
            )
        if run_label not in by_label:
            raise ValidationError(
                f"reference {ref!r} names run {run_label!r}; the runs are {list(by_label)}"
            )
        run = by_label[run_label]
        arms[ref] = _arm(ref, run, resolve_policy(run, wanted, like=policy))
        ref_names.append(ref)
    seed = int(shared["seed"])
    if resamples is None:
        resamples = int(shared["config"].get("bootstrap", 2000))
    comparisons = [
        paired_difference(arms[name], arms[ref], seed, resamples)
        for ref in dict.fromkeys(ref_names)
        for name in arms
        if name != ref
    ]
    return {
        "policy": policy,
        **shared,
        "references": list(dict.fromkeys(ref_names)),
        "bootstrap": {
            "resamples": resamples,
            "confidence": CONFIDENCE,
            "seed": seed,
            "unit": "users, paired (the same users' events in both arms), event-weighted",
        },
        "runs": {
            r.label: {
                "dir": str(r.path),
                "artifact": r.per_user.get("artifact"),
                "token_source": r.per_user.get("token_source"),
                "lm_dir": r.per_user.get("lm_dir"),
                "via": r.per_user.get("via"),
                "versions": (r.results or {}).get("meta", {}).get("versions"),
            }
            for r in runs
        },
        "arms": [
            {
                "arm": a.name,
                "run": a.run,
                "policy": a.policy,
                "token_source": by_label[a.run].per_user.get("token_source"),
                "users": len(a.users),
                "events": int(a.events.sum()),
                shared["metric"]: a.value,
            }
            for a in arms.values()
        ],
        "comparisons": comparisons,
    }


def header_line(res: Mapping[str, Any]) -> str:
    st = res["stream"]
    return (
        f"{res['policy']} across {len(res['runs'])} replays of {res['dataset']['name']} "
        f"(fingerprint {str(res['dataset'].get('fingerprint'))[:12]}, seed {res['seed']}): "
        f"the same {st.get('evaluated_users', '?')} users, {st.get('evaluated_events', '?'):,} "
        f"events; paired user-bootstrap {100 * res['bootstrap']['confidence']:g}% CIs "
        f"({res['bootstrap']['resamples']:,} resamples)"
    )


def arm_rows(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    metric = res["metric"]
    return [
        {
            "arm": a["arm"],
            "run": a["run"],
            "policy": a["policy"],
            "tokens": a["token_source"] or "-",
            "users": a["users"],
            "events": a["events"],
            metric.upper(): a[metric],
        }
        for a in res["arms"]
    ]


def comparison_rows(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    metric = res["metric"].upper()
    return [
        {
            "arm": c["arm"],
            "minus": c["reference"],
            f"{metric} diff": f"{c['diff']:+.4f}",
            "relative": f"{100 * c['rel']:+.1f}%",
            "95% CI": f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]",
            "CI excludes 0": "yes" if c["ci_excludes_zero"] else "no",
        }
        for c in res["comparisons"]
    ]


__all__ = [
    "Arm",
    "LoadedRun",
    "arm_rows",
    "check_runs",
    "compare_runs",
    "comparison_rows",
    "header_line",
    "load_run",
    "paired_difference",
    "parse_run",
    "resolve_policy",
]
