"""Experiments as config: a TOML file with the arms, the split, the salt and the metrics.

Example file (``examples/experiments/adapted-vs-static.toml``)::

    name = "adapted-vs-static"
    salt = "2026-11-adapted-vs-static"
    control = "static"                       # default: the first arm
    primary_metric = "ndcg@10"
    guardrail_metrics = ["hr@10"]            # must not get worse
    secondary_metrics = ["request_rate"]     # reported with CIs, no verdict

    [[arms]]
    name = "static"
    weight = 0.5
    policy = { kind = "static" }

    [[arms]]
    name = "adapted-20"
    weight = 0.5
    policy = { kind = "system", trigger = "gate", budget = 0.2 }

    [analysis]                               # optional, defaults shown
    alpha = 0.05
    power = 0.8
    bootstrap = 2000

    [replay]                                 # optional: how `abtest run` replays
    pre_period_events = 10

Each arm's ``policy`` is a configuration of the system, read by the replay engine
(``recsys.replay.config.PolicySpec.from_dict``) and by the device service:

* ``kind``: ``static`` (base ranker), ``finetune`` (on-device back-prop baseline),
  ``duet`` (DUET-style generator from item ids) or ``system`` (codebook LM + adaptor);
* ``trigger``: ``gate`` (the request gate) or ``timer`` (every N events);
* ``budget``: share of events at which the device may request an edit, in (0, 1];
* ``finetune_every``: events between fine-tuning steps (``finetune`` only).

:func:`load_experiment` raises :class:`~recsys.errors.ValidationError` naming the file
and the field for every mistake (weights not summing to 1, duplicate or unknown arm,
unknown metric, unknown key, wrong type).

Metrics: ``primary_metric`` decides "ship"; ``guardrail_metrics`` must not get
significantly worse (the same two-sided test; there is no non-inferiority margin);
``secondary_metrics`` are reported with their intervals but take no part in the verdict
(e.g. the request rate, which is 0 for a static arm by construction).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recsys.abtest.assignment import WEIGHT_TOLERANCE, assign_arm
from recsys.abtest.metrics import METRICS
from recsys.errors import DataFormatError, NotFoundError, ValidationError

POLICY_KINDS = ("static", "finetune", "duet", "system")
TRIGGERS = ("gate", "timer")
_TOP_KEYS = {
    "name",
    "salt",
    "description",
    "control",
    "primary_metric",
    "guardrail_metrics",
    "secondary_metrics",
    "arms",
    "analysis",
    "replay",
}
_ARM_KEYS = {"name", "weight", "policy", "description"}
_POLICY_KEYS = {"kind", "trigger", "budget", "finetune_every"}


@dataclass(frozen=True)
class Arm:
    """One arm: its name, its share of the traffic and the system configuration it runs."""

    name: str
    weight: float
    policy: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class AnalysisConfig:
    alpha: float = 0.05  # two-sided significance level of every test and interval
    power: float = 0.8  # target power of the power / MDE calculation
    bootstrap: int = 2000  # user-level bootstrap resamples
    # mSPRT mixing sd tau as a multiple of the per-user sd: tau = tau_scale * sd
    # (a prior on plausible effects of a few tenths of a standard deviation)
    tau_scale: float = 0.3
    # a day counts as a look of the sequential test once every arm has this many users
    # (the mSPRT is asymptotic: with a handful of users the variance estimate is too noisy)
    sequential_min_users: int = 20
    seed: int = 0  # bootstrap RNG seed


@dataclass(frozen=True)
class ReplayOptions:
    # each user's first N evaluated replay events form their pre-period: served by the static
    # model, their mean metric there is the user's CUPED covariate; the user enters the
    # experiment (their arm's events start counting) at event N + 1. Users with <= N
    # evaluated events are never exposed. 0 = no pre-period (no CUPED).
    pre_period_events: int = 10
    quantile: float = 0.8  # time split: the replay period starts at this quantile


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    arms: list[Arm]
    primary_metric: str
    guardrail_metrics: list[str]
    control: str
    secondary_metrics: list[str] = field(default_factory=list)  # reported, no verdict
    description: str = ""
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    replay: ReplayOptions = field(default_factory=ReplayOptions)
    source: str | None = None  # the file it was loaded from

    @property
    def arm_pairs(self) -> list[tuple[str, float]]:
        """``(name, weight)`` per arm, the input of :func:`~recsys.abtest.assignment.assign_arm`."""
        return [(a.name, a.weight) for a in self.arms]

    @property
    def metrics(self) -> list[str]:
        """Primary metric first, then the guardrails, then the secondary metrics."""
        return [self.primary_metric, *self.guardrail_metrics, *self.secondary_metrics]

    @property
    def treatments(self) -> list[Arm]:
        return [a for a in self.arms if a.name != self.control]

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise NotFoundError(f"experiment {self.name!r} has no arm {name!r}")

    def assign(self, user_id: str) -> Arm:
        """The arm of ``user_id`` (deterministic, see :mod:`recsys.abtest.assignment`)."""
        return self.arm(assign_arm(self.salt, user_id, self.arm_pairs))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/TOML-able) that :func:`experiment_from_dict` reads back."""
        d = asdict(self)
        d.pop("source")
        return d


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment TOML file."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"experiment file {p} not found; pass the path of a .toml file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataFormatError(p, None, f"invalid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataFormatError(p, None, f"not UTF-8 text ({exc})") from exc
    return experiment_from_dict(data, source=str(p))


def experiment_from_dict(data: dict[str, Any], *, source: str | None = None) -> Experiment:
    """Validate a parsed experiment (e.g. TOML) and build the :class:`Experiment`."""
    where = source or "experiment"

    def fail(fld: str, problem: str) -> ValidationError:
        return ValidationError(f"{where}: {fld}: {problem}")

    if not isinstance(data, dict):
        raise fail("(top level)", "expected a table of settings")
    _no_unknown(data, _TOP_KEYS, "(top level)", fail)
    name = _string(data, "name", fail)
    salt = _string(data, "salt", fail)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("description", f"expected a string, got {description!r}")

    raw_arms = data.get("arms")
    if not isinstance(raw_arms, list) or not raw_arms:
        raise fail("arms", "give at least two [[arms]] tables (a control and a treatment)")
    if len(raw_arms) < 2:
        raise fail("arms", "an experiment needs at least two arms (a control and a treatment)")
    arms = [_arm(i, a, fail) for i, a in enumerate(raw_arms)]
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise fail("arms", f"duplicate arm name(s) {dupes}; give every arm its own name")
    total = sum(a.weight for a in arms)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise fail(
            "arms.weight",
            f"the weights {[a.weight for a in arms]} sum to {total!r}, not 1; rescale them "
            "so that they add up to exactly 1",
        )

    control = _string(data, "control", fail, required=False) or arms[0].name
    if control not in names:
        raise fail("control", f"{control!r} is not an arm; arms are {names}")

    primary = _string(data, "primary_metric", fail)
    if primary not in METRICS:
        raise fail("primary_metric", f"unknown metric {primary!r}; known: {list(METRICS)}")
    guard = _metric_list(data, "guardrail_metrics", fail)
    secondary = _metric_list(data, "secondary_metrics", fail)
    listed = [primary, *guard, *secondary]
    if len(set(listed)) != len(listed):
        raise fail(
            "guardrail_metrics",
            "list each metric once: primary, guardrail and secondary metrics must not overlap",
        )

    return Experiment(
        name=name,
        salt=salt,
        arms=arms,
        primary_metric=primary,
        guardrail_metrics=guard,
        control=control,
        secondary_metrics=secondary,
        description=description,
        analysis=_analysis(data.get("analysis", {}), fail),
        replay=_replay(data.get("replay", {}), fail),
        source=source,
    )


def _metric_list(data: dict[str, Any], key: str, fail) -> list[str]:
    values = data.get(key, [])
    if not isinstance(values, list) or not all(isinstance(g, str) for g in values):
        raise fail(key, f"expected a list of metric names, got {values!r}")
    for g in values:
        if g not in METRICS:
            raise fail(key, f"unknown metric {g!r}; known: {list(METRICS)}")
    return list(values)


def _no_unknown(d: dict[str, Any], allowed: set[str], fld: str, fail) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise fail(fld, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _string(d: dict[str, Any], key: str, fail, *, required: bool = True) -> str | None:
    value = d.get(key)
    if value is None:
        if required:
            raise fail(key, "missing; it is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise fail(key, f"expected a non-empty string, got {value!r}")
    return value


def _number(d: dict[str, Any], key: str, fld: str, fail, lo: float, hi: float, default):
    value = d.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(fld, f"expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise fail(fld, f"{value!r} is outside [{lo}, {hi}]")
    return value


def _arm(i: int, raw: Any, fail) -> Arm:
    fld = f"arms[{i}]"
    if not isinstance(raw, dict):
        raise fail(fld, "expected a table with name, weight and policy")
    _no_unknown(raw, _ARM_KEYS, fld, fail)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise fail(f"{fld}.name", f"expected a non-empty string of <= 100 chars, got {name!r}")
    if "weight" not in raw:
        raise fail(f"{fld}.weight", "missing; give the arm's share of traffic in [0, 1]")
    weight = float(_number(raw, "weight", f"{fld}.weight", fail, 0.0, 1.0, None))
    policy = raw.get("policy")
    if not isinstance(policy, dict):
        raise fail(f"{fld}.policy", 'missing; e.g. policy = { kind = "static" }')
    return Arm(
        name, weight, _policy(policy, f"{fld}.policy", fail), str(raw.get("description", ""))
    )


def _policy(raw: dict[str, Any], fld: str, fail) -> dict[str, Any]:
    _no_unknown(raw, _POLICY_KEYS, fld, fail)
    kind = raw.get("kind")
    if kind not in POLICY_KINDS:
        raise fail(f"{fld}.kind", f"{kind!r} is not one of {list(POLICY_KINDS)}")
    out: dict[str, Any] = {"kind": kind}
    if "trigger" in raw:
        if raw["trigger"] not in TRIGGERS:
            raise fail(f"{fld}.trigger", f"{raw['trigger']!r} is not one of {list(TRIGGERS)}")
        out["trigger"] = raw["trigger"]
    if "budget" in raw:
        budget = _number(raw, "budget", f"{fld}.budget", fail, 0.0, 1.0, None)
        if budget <= 0:
            raise fail(f"{fld}.budget", "must be > 0 (a share of events in (0, 1])")
        out["budget"] = float(budget)
    if "finetune_every" in raw:
        every = raw["finetune_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise fail(f"{fld}.finetune_every", f"expected an integer >= 1, got {every!r}")
        if kind != "finetune":
            raise fail(f"{fld}.finetune_every", f"only applies to kind 'finetune', not {kind!r}")
        out["finetune_every"] = every
    if kind == "static" and ("trigger" in out or "budget" in out):
        raise fail(fld, "a static policy never requests edits; drop trigger and budget")
    return out


def _analysis(raw: Any, fail) -> AnalysisConfig:
    if not isinstance(raw, dict):
        raise fail("analysis", "expected a table")
    _no_unknown(raw, set(AnalysisConfig.__dataclass_fields__), "analysis", fail)
    d = AnalysisConfig()
    boot = raw.get("bootstrap", d.bootstrap)
    if isinstance(boot, bool) or not isinstance(boot, int) or not 100 <= boot <= 100_000:
        raise fail("analysis.bootstrap", f"expected an integer in [100, 100000], got {boot!r}")
    min_users = raw.get("sequential_min_users", d.sequential_min_users)
    if isinstance(min_users, bool) or not isinstance(min_users, int) or min_users < 2:
        raise fail("analysis.sequential_min_users", f"expected an integer >= 2, got {min_users!r}")
    seed = raw.get("seed", d.seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail("analysis.seed", f"expected an integer, got {seed!r}")
    return AnalysisConfig(
        alpha=float(_number(raw, "alpha", "analysis.alpha", fail, 1e-6, 0.5, d.alpha)),
        power=float(_number(raw, "power", "analysis.power", fail, 0.05, 0.999, d.power)),
        bootstrap=boot,
        tau_scale=float(
            _number(raw, "tau_scale", "analysis.tau_scale", fail, 1e-3, 100.0, d.tau_scale)
        ),
        sequential_min_users=min_users,
        seed=seed,
    )


def _replay(raw: Any, fail) -> ReplayOptions:
    if not isinstance(raw, dict):
        raise fail("replay", "expected a table")
    _no_unknown(raw, set(ReplayOptions.__dataclass_fields__), "replay", fail)
    d = ReplayOptions()
    pre = raw.get("pre_period_events", d.pre_period_events)
    if isinstance(pre, bool) or not isinstance(pre, int) or not 0 <= pre <= 10_000:
        raise fail("replay.pre_period_events", f"expected an integer in [0, 10000], got {pre!r}")
    q = _number(raw, "quantile", "replay.quantile", fail, 0.05, 0.99, d.quantile)
    return ReplayOptions(pre_period_events=pre, quantile=float(q))
