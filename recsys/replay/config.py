"""What a replay runs: the protocol (:class:`ReplayConfig`) and the policies (:class:`PolicySpec`).

A policy is one way a device keeps its head up to date while the replay period streams
in; every policy sees the same events, the same histories and the same sampled
negatives (:mod:`recsys.replay.stream`).

* ``static``: the frozen base ranker, never edited.
* ``finetune``: on-device back-propagation (:func:`device_ranker.finetune.finetune_head`)
  on the device's recent events every ``finetune_every`` events (the costly baseline).
* ``duet``: the DUET-style generator's edit from the raw recent item ids (no LM, no
  codebook), requested by ``trigger`` at ``budget``.
* ``system``: the full system: codebook-LM tokens + adaptor + prototypes (bank frozen at
  the artefact's version), requested by ``trigger`` at ``budget``.

Triggers: ``"gate"`` is the shift-score request gate (:mod:`device_ranker.gate`) with a
threshold calibrated ONCE on the training period so that the requested fraction of
events is ``budget`` (:mod:`recsys.replay.gate_calibration`); ``"timer"`` asks every
``round(1 / budget)`` events. Both make a device's first request as soon as it has
``min_history`` events.

Example::

    specs = [PolicySpec("static"), PolicySpec("system", "gate", 0.1)]
    [s.label for s in specs]                  # ['static', 'system gate 10%']
    PolicySpec.from_dict({"kind": "system", "trigger": "timer", "budget": 0.2}).label
    cfg = ReplayConfig(seed=1, workers=2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from recsys.errors import ValidationError

KINDS = ("static", "finetune", "duet", "system")
TRIGGERS = ("gate", "timer")
DEFAULT_BUDGETS = (1.0, 0.5, 0.2, 0.1, 0.05)
QUICK_BUDGETS = (1.0, 0.2)


def _pct(budget: float) -> str:
    return f"{100 * budget:g}%"


@dataclass(frozen=True)
class PolicySpec:
    """One policy of a replay (see the module docstring).

    Attributes:
        kind: "static" | "finetune" | "duet" | "system".
        trigger: "gate" (shift-score gate) | "timer" (every round(1/budget) events);
            ignored by static and finetune.
        budget: fraction of evaluated events that may trigger a request, in (0, 1].
        finetune_every: events between two fine-tuning updates (finetune only).
        name: display name; default derived from the fields (:attr:`label`).
    """

    kind: str
    trigger: str = "gate"
    budget: float = 1.0
    finetune_every: int = 5
    name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValidationError(f"policy kind must be one of {KINDS}, got {self.kind!r}")
        if self.trigger not in TRIGGERS:
            raise ValidationError(f"policy trigger must be one of {TRIGGERS}, got {self.trigger!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | float):
            raise ValidationError(f"policy budget must be a number in (0, 1], got {self.budget!r}")
        if not 0.0 < float(self.budget) <= 1.0:
            raise ValidationError(
                f"policy budget must be in (0, 1] (a fraction of events), got {self.budget}"
            )
        if isinstance(self.finetune_every, bool) or not isinstance(self.finetune_every, int):
            raise ValidationError(f"finetune_every must be an integer, got {self.finetune_every!r}")
        if self.finetune_every < 1:
            raise ValidationError(f"finetune_every must be >= 1, got {self.finetune_every}")
        if self.name is not None and not str(self.name).strip():
            raise ValidationError("policy name must not be empty")

    @property
    def period(self) -> int:
        """Events between timer requests: ``round(1 / budget)`` (finetune: finetune_every)."""
        if self.kind == "finetune":
            return self.finetune_every
        return max(1, round(1.0 / self.budget))

    @property
    def label(self) -> str:
        """The display name, e.g. ``static``, ``finetune every 5``, ``system gate 20%``."""
        if self.name:
            return self.name
        if self.kind == "static":
            return "static"
        if self.kind == "finetune":
            return f"finetune every {self.finetune_every}"
        return f"{self.kind} {self.trigger} {_pct(self.budget)}"

    @property
    def requests(self) -> bool:
        """Whether the policy ever changes the head (everything but static)."""
        return self.kind != "static"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicySpec:
        """Build from a plain mapping (config files); unknown keys are an error.

        A ``label`` key (as written by :meth:`to_dict`) is accepted and ignored.
        """
        if not isinstance(d, Mapping):
            raise ValidationError(f"a policy must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known - {"label"}
        if extra:
            raise ValidationError(
                f"unknown policy key(s) {sorted(extra)}; allowed: {sorted(known)}"
            )
        if "kind" not in d:
            raise ValidationError(f"a policy needs a 'kind' (one of {KINDS})")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """Parse the CLI form: ``static``, ``finetune``, ``finetune:10`` (every 10 events),
        ``system:gate:0.2``, ``duet:timer:0.1`` (budget as a fraction or ``20%``)."""
        parts = [p.strip() for p in text.split(":")]
        kind = parts[0]
        if kind not in KINDS:
            raise ValidationError(f"policy {text!r}: kind must be one of {KINDS}")
        if kind == "static":
            if len(parts) > 1:
                raise ValidationError(f"policy {text!r}: static takes no options")
            return cls("static")
        if kind == "finetune":
            if len(parts) > 2:
                raise ValidationError(f"policy {text!r}: use finetune or finetune:N")
            return cls("finetune", finetune_every=_int(parts[1], text) if len(parts) > 1 else 5)
        if len(parts) > 3:
            raise ValidationError(f"policy {text!r}: use {kind}[:gate|timer[:BUDGET]]")
        trigger = parts[1] if len(parts) > 1 else "gate"
        budget = parse_budget(parts[2]) if len(parts) > 2 else 1.0
        return cls(kind, trigger, budget)


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValidationError(f"policy {where!r}: {text!r} is not an integer") from None


def parse_budget(text: str) -> float:
    """``"0.2"``, ``"20%"`` or ``"20"`` (a percentage when > 1) -> 0.2; validated."""
    raw = text.strip()
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise ValidationError(
            f"budget {text!r} is not a number (use a fraction like 0.2 or a percentage like 20%)"
        ) from None
    if raw.endswith("%") or value > 1.0:
        value /= 100.0
    if not 0.0 < value <= 1.0:
        raise ValidationError(f"budget {text!r} must be in (0, 100%]")
    return value


def default_policies(budgets: Sequence[float] = DEFAULT_BUDGETS) -> list[PolicySpec]:
    """static, finetune every 5, DUET-style (gate, largest budget), and the full system
    with the gate and with the timer at every budget."""
    budgets = sorted({float(b) for b in budgets}, reverse=True)
    if not budgets:
        raise ValidationError("at least one budget is needed")
    specs = [PolicySpec("static"), PolicySpec("finetune"), PolicySpec("duet", "gate", budgets[0])]
    specs += [PolicySpec("system", "gate", b) for b in budgets]
    specs += [PolicySpec("system", "timer", b) for b in budgets]
    return specs


@dataclass(frozen=True)
class ReplayConfig:
    """The replay protocol (written into every result).

    Attributes:
        quantile: time-split quantile; must equal the one the adaptor artefact was
            trained with (0.8 by default), checked by the engine.
        min_history: events a device needs before it is evaluated and first requests
            an edit (5, as in ``recsys eval adaptor`` and the generators' training).
        negatives: sampled negatives per evaluated event for AUC / UAUC (100).
        seed: seeds the negatives (per (seed, user, event position)) and the bootstrap.
        workers: processes the users are split across (results do not depend on it).
        quick: CI mode: at most ``quick_users`` users (the CLI also uses ``QUICK_BUDGETS``).
        quick_users: users kept by ``quick`` (the first in a seeded permutation).
        max_users: keep at most this many users (seeded sample; None = all).
        gate_window: W of the shift gate (recent items compared with the anchor window).
        gate_min_gap: events between two gate requests of one device (1: any event may).
        finetune_steps / finetune_lr: each on-device fine-tuning update (Adam on the head).
        payload_dtype: downlink payload dtype ("fp16", "int8" or "fp32").
        uplink_items: recent item ids a request carries (the LM / DUET read at most 20).
        chunk_users: users processed together (fixed blocks of the sorted user list, so
            batches do not depend on the worker count).
        batch_size: events scored per batch.
        lm_batch: histories per LM generation call (within one user).
        bootstrap: user-bootstrap resamples of the NDCG@10 difference CIs.
        artifact: adaptor artefact path (None: CACHE/artifacts/NAME/adaptor/adaptor.pt).
    """

    quantile: float = 0.8
    min_history: int = 5
    negatives: int = 100
    seed: int = 0
    workers: int = 1
    quick: bool = False
    quick_users: int = 24
    max_users: int | None = None
    gate_window: int = 10
    gate_min_gap: int = 1
    finetune_steps: int = 5
    finetune_lr: float = (
        3e-3  # best of 1e-2 / 3e-3 / 1e-3 on ml-100k's replay (favours the baseline)
    )
    payload_dtype: str = "fp16"
    uplink_items: int = 20
    chunk_users: int = 16
    batch_size: int = 256
    lm_batch: int = 64
    bootstrap: int = 2000
    artifact: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile < 1.0:
            raise ValidationError(f"quantile must be in (0, 1), got {self.quantile}")
        for name in (
            "min_history",
            "negatives",
            "workers",
            "quick_users",
            "gate_window",
            "gate_min_gap",
            "finetune_steps",
            "uplink_items",
            "chunk_users",
            "batch_size",
            "lm_batch",
            "bootstrap",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(f"{name} must be an integer >= 1, got {value!r}")
        if self.min_history < 2:
            raise ValidationError(
                f"min_history must be >= 2 (fine-tuning needs two events), got {self.min_history}"
            )
        if self.max_users is not None and self.max_users < 1:
            raise ValidationError(f"max_users must be >= 1, got {self.max_users}")
        if self.finetune_lr <= 0:
            raise ValidationError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        if self.payload_dtype not in ("fp16", "int8", "fp32"):
            raise ValidationError(
                f"payload_dtype must be fp16, int8 or fp32, got {self.payload_dtype!r}"
            )

    @property
    def user_limit(self) -> int | None:
        """How many users the replay keeps (quick and max_users combined)."""
        limits = [n for n in (self.max_users, self.quick_users if self.quick else None) if n]
        return min(limits) if limits else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReplayConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValidationError(
                f"unknown replay config key(s) {sorted(extra)}; allowed: {sorted(known)}"
            )
        return cls(**dict(d))
