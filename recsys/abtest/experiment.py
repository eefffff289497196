"""Experiments as config: a TOML file with the arms, the split, the salt and the metrics.

The file is described by the pydantic models below (unknown keys are an error, every
number has its range, kinds and metrics are closed lists); :func:`load_experiment`
validates it through :func:`recsys.validation.validate_model`, so every mistake is one
:class:`~recsys.errors.ValidationError` naming the file, the table and field, the bad
value and what is allowed, e.g.
``exp.toml: arms.1.policy.budget: Input should be less than or equal to 1 (got 1.5)``.

Top-level keys: ``name``, ``salt`` (the assignment hash's salt), ``description``,
``control`` (default: the first arm), ``primary_metric`` (decides "ship"),
``guardrail_metrics`` (must not get significantly worse: the same two-sided test, no
non-inferiority margin), ``secondary_metrics`` (reported with intervals, no verdict, e.g.
the request rate, which is 0 for a static arm by construction); tables ``[[arms]]``
(``name``, ``weight``: share of traffic, weights sum to 1; ``policy``; ``description``),
``[analysis]`` (:class:`AnalysisConfig`) and ``[replay]`` (:class:`ReplayOptions`).

Each arm's ``policy`` is a configuration of the system, read by the replay engine
(``recsys.replay.config.PolicySpec.from_dict``) and by the device service:

* ``kind``: ``static`` (base ranker), ``finetune`` (on-device back-prop baseline),
  ``duet`` (DUET-style generator from item ids) or ``system`` (codebook LM + adaptor);
* ``trigger``: ``gate`` (the request gate) or ``timer`` (every N events);
* ``budget``: share of events at which the device may request an edit, in (0, 1];
* ``finetune_every``: events between fine-tuning steps (``finetune`` only);
* ``guard`` / ``fleet_guard`` / ``fleet_proof`` / ``guard_z`` (``duet`` and ``system``
  only; **offline only**, ``recsys abtest run``): the arm's harm guard, as in
  ``recsys replay``'s ``:guard`` / ``:fleet-guard=Z`` / ``:fleet-proof=Z`` policies, so
  "guard vs no guard" is an experiment. A device server has one guard setting for every
  user (``recsys serve device --guard``, ``recsys serve cloud --fleet-guard``), so it
  refuses an experiment whose arms set these keys.

A complete, commented file is ``examples/experiments/adapted-vs-static.toml``.

Example::

    exp = load_experiment("examples/experiments/adapted-vs-static.toml")
    exp.control, exp.metrics[0]        # ('static', 'ndcg@10')
    exp.assign("42").name              # the user's arm, deterministic in (salt, user)
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from recsys.abtest.assignment import WEIGHT_TOLERANCE, assign_arm
from recsys.abtest.metrics import METRICS
from recsys.errors import DataFormatError, NotFoundError
from recsys.validation import validate_model

POLICY_KINDS = ("static", "finetune", "duet", "system")
TRIGGERS = ("gate", "timer")

# strict: no "0.5" for a number, no true for an integer (an int is still a valid float)
_TABLE = ConfigDict(extra="forbid", strict=True, frozen=True)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Text = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]
ArmName = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_not_blank)]
Metric = Literal[tuple(METRICS)]  # type: ignore[valid-type]  # the names in METRICS


class _Policy(BaseModel):
    """One arm's ``policy`` table (stored on the :class:`Arm` as a plain dict)."""

    model_config = _TABLE

    kind: Literal[POLICY_KINDS]  # type: ignore[valid-type]
    trigger: Literal[TRIGGERS] | None = None  # type: ignore[valid-type]
    budget: float | None = Field(None, gt=0.0, le=1.0)  # share of events, (0, 1]
    finetune_every: int | None = Field(None, ge=1)  # events between fine-tuning steps
    # the arm's harm guard (offline only; recsys.replay.config.PolicySpec's fields)
    guard: bool | None = None
    fleet_guard: bool | None = None
    fleet_proof: bool | None = None
    guard_z: float | None = Field(None, ge=0.0)

    @model_validator(mode="after")
    def _fits_the_kind(self) -> _Policy:
        if self.finetune_every is not None and self.kind != "finetune":
            raise ValueError(f"finetune_every only applies to kind 'finetune', not {self.kind!r}")
        if self.kind == "static" and (self.trigger is not None or self.budget is not None):
            raise ValueError("a static policy never requests edits; drop trigger and budget")
        if self.guard and self.kind not in ("duet", "system"):
            raise ValueError(f"guard applies to duet and system policies, not {self.kind!r}")
        if self.fleet_guard and not self.guard:
            raise ValueError("fleet_guard = true needs guard = true (the fleet guard is a guard)")
        if self.fleet_proof and not self.fleet_guard:
            raise ValueError("fleet_proof = true needs fleet_guard = true")
        if self.guard_z is not None and not self.fleet_guard:
            raise ValueError("guard_z is the fleet guard's level: it needs fleet_guard = true")
        return self


class Arm(BaseModel):
    """One arm: its name, its share of the traffic and the system configuration it runs."""

    model_config = _TABLE

    name: ArmName
    weight: float = Field(ge=0.0, le=1.0)
    policy: dict[str, Any]  # the keys given in the file, validated by _Policy
    description: str = ""

    @field_validator("policy", mode="before")
    @classmethod
    def _valid_policy(cls, value: Any) -> dict[str, Any]:
        return _Policy.model_validate(value).model_dump(exclude_none=True)


class AnalysisConfig(BaseModel):
    """The ``[analysis]`` table."""

    model_config = _TABLE

    # two-sided significance level of every test and interval
    alpha: float = Field(0.05, ge=1e-6, le=0.5)
    power: float = Field(0.8, ge=0.05, le=0.999)  # target power of the power / MDE calculation
    bootstrap: int = Field(2000, ge=100, le=100_000)  # user-level bootstrap resamples
    # mSPRT mixing sd tau as a multiple of the per-user sd: tau = tau_scale * sd
    # (a prior on plausible effects of a few tenths of a standard deviation)
    tau_scale: float = Field(0.3, ge=1e-3, le=100.0)
    # a day counts as a look of the sequential test once every arm has this many users
    # (the mSPRT is asymptotic: with a handful of users the variance estimate is too noisy)
    sequential_min_users: int = Field(20, ge=2)
    seed: int = 0  # bootstrap RNG seed


class ReplayOptions(BaseModel):
    """The ``[replay]`` table: how ``recsys abtest run`` replays."""

    model_config = _TABLE

    # each user's first N evaluated replay events form their pre-period: served by the static
    # model, their mean metric there is the user's CUPED covariate; the user enters the
    # experiment (their arm's events start counting) at event N + 1. Users with <= N
    # evaluated events are never exposed. 0 = no pre-period (no CUPED).
    pre_period_events: int = Field(10, ge=0, le=10_000)
    quantile: float = Field(0.8, ge=0.05, le=0.99)  # time split: replay starts here


class Experiment(BaseModel):
    """A validated experiment; build it with :func:`load_experiment` or
    :func:`experiment_from_dict`."""

    model_config = _TABLE

    name: Text
    salt: Text
    arms: list[Arm]
    primary_metric: Metric
    guardrail_metrics: list[Metric] = []
    control: ArmName | None = None  # None in the file: the first arm (set on validation)
    secondary_metrics: list[Metric] = []  # reported, no verdict
    description: str = ""
    analysis: AnalysisConfig = AnalysisConfig()
    replay: ReplayOptions = ReplayOptions()
    _source: str | None = PrivateAttr(None)  # the file it was loaded from

    @model_validator(mode="before")
    @classmethod
    def _control_defaults_to_the_first_arm(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("control") is None:
            arms = data.get("arms")
            if isinstance(arms, list) and arms and isinstance(arms[0], dict):
                data = {**data, "control": arms[0].get("name")}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        names = [a.name for a in self.arms]
        if len(names) < 2:
            raise ValueError(
                "arms: an experiment needs at least two [[arms]] (a control and a treatment)"
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arms: duplicate arm name(s) {dupes}; give every arm its own name")
        total = sum(a.weight for a in self.arms)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise ValueError(
                f"arms.weight: the weights {[a.weight for a in self.arms]} sum to {total!r}, "
                "not 1; rescale them so that they add up to exactly 1"
            )
        if self.control not in names:
            raise ValueError(f"control: {self.control!r} is not an arm; arms are {names}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(
                "guardrail_metrics: list each metric once: primary, guardrail and secondary "
                "metrics must not overlap"
            )
        return self

    @property
    def source(self) -> str | None:
        """The file the experiment was loaded from (None if built from a dict)."""
        return self._source

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
        return self.model_dump()


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


def experiment_from_dict(data: Any, *, source: str | None = None) -> Experiment:
    """Validate a parsed experiment (TOML, or :meth:`Experiment.to_dict` through JSON).

    Raises :class:`~recsys.errors.ValidationError` titled ``source`` (or "experiment").
    """
    exp = validate_model(Experiment, data, source or "experiment")
    exp._source = source
    return exp
