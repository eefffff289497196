"""What a replay runs: the protocol (:class:`ReplayConfig`), the policies
(:class:`PolicySpec`) and, for the run through the real services, :class:`GrpcOptions`.

A policy is one way a device keeps its head up to date while the replay period streams
in; every policy sees the same events, the same histories and the same sampled
negatives (:mod:`recsys.replay.stream`).

* ``static``: the frozen base ranker, never edited.
* ``finetune``: on-device back-propagation (:func:`device_ranker.finetune.finetune_head`)
  on the device's recent events every ``finetune_every`` events (the costly baseline).
* ``duet``: the DUET-style generator's edit from the raw recent item ids (no LM, no
  codebook), requested by ``trigger`` at ``budget``.
* ``system``: the full system: codebook-LM tokens + adaptor + prototypes (bank frozen at
  the artefact's version), requested by ``trigger`` at ``budget``. With
  ``prototypes=False`` (CLI ``system-noproto``) the device receives the adaptor's own
  bounded edit, with no prototype (the ablation of ``recsys eval adaptor``). With
  ``refine=True`` (CLI ``system-refine``; no prototypes) the cloud first refines the
  adaptor's edit with a few gradient steps of the fine-tuning objective on the device's
  recent positions (:mod:`codebook.refine`, ``ReplayConfig.refine``); the device still
  only applies the edit. In process only, for now (issue 13).

Triggers: ``"gate"`` is the shift-score request gate (:mod:`device_ranker.gate`) with a
threshold calibrated ONCE on the training period so that the requested fraction of
events is ``budget`` (:mod:`recsys.replay.gate_calibration`); ``"learned"`` is the learned
gate (:mod:`device_ranker.learned_gate`, trained and calibrated on the training period by
``recsys replay train-gate``; ``ReplayConfig.learned_gate``); ``"timer"`` asks every
``round(1 / budget)`` events. All make a device's first request as soon as it has
``min_history`` events.

``guard=True`` (CLI suffix ``:guard``, label suffix `` guard``; duet and system kinds)
puts the harm guard (:mod:`device_ranker.guard`, ``ReplayConfig.guard``) in front of the
policy's edits: a new edit is applied only if this user's earlier edits did not rank
their later clicks worse than the base head; otherwise the device serves the base head.
With ``fleet_guard=True`` as well (CLI suffix ``:fleet-guard``) the same test runs in the
cloud on the evidence of EVERY device's earlier clicks (:mod:`recsys.replay.guard`).
``fleet_proof=True`` (suffix ``:fleet-proof``) turns that pooled test around: edits are
applied only once the pooled evidence shows they help (device-clustered standard error),
so a dataset where edits do not help stays on the base head.

Configs are validated at construction (:func:`recsys.validation.config_dataclass`):
a bad value raises :class:`recsys.errors.ValidationError` naming the field and range.

Example::

    specs = [PolicySpec("static"), PolicySpec("system", "gate", 0.1)]
    [s.label for s in specs]                  # ['static', 'system gate 10%']
    PolicySpec.from_dict({"kind": "system", "trigger": "timer", "budget": 0.2}).label
    PolicySpec.parse("system-noproto:timer:0.2").label   # 'system-noproto timer 20%'
    PolicySpec.parse("system:learned:0.1:guard").label   # 'system learned 10% guard'
    cfg = ReplayConfig(seed=1, workers=2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, field
from typing import Any, Literal

from pydantic import Field

from codebook.continual import ContinualConfig
from codebook.refine import RefineConfig
from device_ranker.guard import GuardConfig
from recsys.errors import ValidationError
from recsys.validation import config_dataclass

KINDS = ("static", "finetune", "duet", "system")
TRIGGERS = ("gate", "timer", "learned")
FLEET_GUARD = "fleet-guard"  # ... of policies whose guard pools every device's evidence
FLEET_PROOF = "fleet-proof"  # ... of policies whose pooled guard applies only proven edits
GUARD = "guard"  # the CLI suffix (system:timer:0.1:guard) and label suffix of guarded policies
NO_PROTOTYPES = "system-noproto"  # the CLI / label name of the system without prototypes
REFINE = "system-refine"  # ... of the system whose cloud refines the adaptor's edit
LIVE = "system-live"  # ... of the system whose prototypes are refined online (global time)
CONTINUAL = "system-continual"  # ... whose adaptor keeps learning from the uplinks (global time)
LIVE_KINDS = (LIVE, CONTINUAL)  # edit kinds that need the global-time replay
SYSTEM_KINDS = (NO_PROTOTYPES, REFINE, *LIVE_KINDS)  # the CLI names of system variants
GLOBAL_SLICES = 200  # default slices of a global-time replay period
DEFAULT_BUDGETS = (1.0, 0.5, 0.2, 0.1, 0.05)
QUICK_BUDGETS = (1.0, 0.2)


def _pct(budget: float) -> str:
    return f"{100 * budget:g}%"


@config_dataclass
class PolicySpec:
    """One policy of a replay (see the module docstring).

    Attributes:
        kind: "static" | "finetune" | "duet" | "system".
        trigger: "gate" (shift-score gate) | "learned" (learned gate) | "timer" (every
            round(1/budget) events); ignored by static and finetune.
        budget: fraction of evaluated events that may trigger a request, in (0, 1].
        finetune_every: events between two fine-tuning updates (finetune only).
        name: display name; default derived from the fields (:attr:`label`).
        prototypes: system only: the edit is a residual against the nearest prototype
            (True, the full system) or the adaptor's own edit (False).
        refine: system without prototypes only: the cloud refines the adaptor's edit
            (:mod:`codebook.refine`) before sending it.
        live: system with prototypes only: the prototype bank is refined online from
            every device's requests in stream order (global-time replay only).
        continual: system without prototypes only: the cloud's adaptor keeps training
            on what devices uplinked so far (:mod:`codebook.continual`; global time only).
        guard: duet / system only: the harm guard decides whether each new edit is
            applied (:mod:`device_ranker.guard`); in process only.
        fleet_guard: with ``guard``: the test pools every device's earlier clicks (the
            cloud's fleet guard) instead of the device's own.
        fleet_proof: with ``fleet_guard``: edits are applied only when the pooled
            evidence shows they help (opt-in), not unless it shows they hurt.
        guard_z: with ``fleet_guard``: this policy's test level in standard errors
            instead of the run's ``GuardConfig.z`` (CLI ``:fleet-proof=0``), so one
            replay compares levels on the same stream; None: the run's.
    """

    kind: Literal["static", "finetune", "duet", "system"]
    trigger: Literal["gate", "timer", "learned"] = "gate"
    budget: float = Field(1.0, gt=0.0, le=1.0)  # a fraction of events
    finetune_every: int = Field(5, ge=1)
    name: str | None = None
    prototypes: bool = True
    refine: bool = False
    live: bool = False
    continual: bool = False
    guard: bool = False
    fleet_guard: bool = False
    fleet_proof: bool = False
    guard_z: float | None = Field(None, ge=0.0)

    def __post_init__(self) -> None:
        if self.name is not None and not self.name.strip():
            raise ValueError("policy name must not be empty")
        if not self.prototypes and self.kind != "system":
            raise ValueError(f"prototypes=False applies to system policies only, not {self.kind}")
        if self.refine and (self.kind != "system" or self.prototypes):
            raise ValueError("refine=True applies to system policies with prototypes=False")
        if self.live and (self.kind != "system" or not self.prototypes):
            raise ValueError("live=True applies to system policies with prototypes")
        if self.continual and (self.kind != "system" or self.prototypes or self.refine):
            raise ValueError(
                "continual=True applies to system policies with prototypes=False, refine=False"
            )
        if self.fleet_guard and not self.guard:
            raise ValueError("fleet_guard=True needs guard=True")
        if self.fleet_proof and not self.fleet_guard:
            raise ValueError("fleet_proof=True needs fleet_guard=True")
        if self.guard_z is not None and not self.fleet_guard:
            raise ValueError(
                "guard_z applies to fleet-guarded policies (the device guard's is --guard-z)"
            )
        if self.guard and (self.kind not in ("system", "duet") or self.global_time):
            raise ValueError("guard=True applies to duet and system policies (not global time)")

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
        scope = FLEET_PROOF if self.fleet_proof else FLEET_GUARD if self.fleet_guard else GUARD
        guard = f" {scope}" if self.guard else ""
        if self.guard_z is not None:
            guard += f" z={self.guard_z:g}"
        return f"{self.edit_kind} {self.trigger} {_pct(self.budget)}{guard}"

    @property
    def requests(self) -> bool:
        """Whether the policy ever changes the head (everything but static)."""
        return self.kind != "static"

    @property
    def edit_kind(self) -> str | None:
        """Which edits the policy applies: "system", "system-noproto", "duet", "finetune"
        (None: static); policies of one edit kind share the edit at a request point."""
        if self.kind == "static":
            return None
        if self.kind == "system" and not self.prototypes:
            return REFINE if self.refine else CONTINUAL if self.continual else NO_PROTOTYPES
        if self.kind == "system" and self.live:
            return LIVE
        return self.kind

    @property
    def global_time(self) -> bool:
        """Whether the policy needs the global-time replay (its edits depend on other
        devices' earlier requests)."""
        return self.edit_kind in LIVE_KINDS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"label": self.label}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicySpec:
        """Build from a plain mapping (config files); unknown keys are an error.

        A ``label`` key (as written by :meth:`to_dict`) is accepted and ignored.
        """
        if not isinstance(d, Mapping):
            raise ValidationError(f"a policy must be a mapping, got {type(d).__name__}")
        return cls(**{k: v for k, v in d.items() if k != "label"})

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """Parse the CLI form: ``static``, ``finetune``, ``finetune:10`` (every 10 events),
        ``system:gate:0.2``, ``duet:timer:0.1``, ``system-noproto:timer:0.2``,
        ``system-refine:gate:1.0``, ``system-live:gate:0.1``, ``system-continual``,
        ``system:learned:0.1`` (budget as a fraction or ``20%``); a last ``:guard`` puts
        the harm guard in front (``system:timer:0.1:guard``), ``:fleet-guard`` the cloud's
        pooled one, ``:fleet-proof`` the pooled opt-in one; ``:fleet-guard=Z`` /
        ``:fleet-proof=Z`` set that policy's test level (``guard_z``)."""
        parts = [p.strip() for p in text.split(":")]
        guard_z = None
        if len(parts) > 1 and parts[-1].partition("=")[0] in (FLEET_GUARD, FLEET_PROOF):
            scope, eq, level = parts[-1].partition("=")
            if eq:
                try:
                    guard_z = float(level)
                except ValueError:
                    raise ValidationError(
                        f"policy {text!r}: {scope}={level!r}: the level must be a number of "
                        f"standard errors, e.g. {scope}=0 or {scope}=1.645"
                    ) from None
                parts[-1] = scope
        proof = len(parts) > 1 and parts[-1] == FLEET_PROOF
        fleet = len(parts) > 1 and parts[-1] in (FLEET_GUARD, FLEET_PROOF)
        guard = len(parts) > 1 and parts[-1] in (GUARD, FLEET_GUARD, FLEET_PROOF)
        if guard:
            parts = parts[:-1]
        kind = parts[0]
        if kind not in (*KINDS, *SYSTEM_KINDS):
            raise ValidationError(f"policy {text!r}: kind must be one of {(*KINDS, *SYSTEM_KINDS)}")
        if guard and kind in ("static", "finetune"):
            raise ValidationError(f"policy {text!r}: the guard applies to duet and system kinds")
        if kind == "static":
            if len(parts) > 1:
                raise ValidationError(f"policy {text!r}: static takes no options")
            return cls(kind="static")
        if kind == "finetune":
            if len(parts) > 2:
                raise ValidationError(f"policy {text!r}: use finetune or finetune:N")
            every = _int(parts[1], text) if len(parts) > 1 else 5
            return cls(kind="finetune", finetune_every=every)
        if len(parts) > 3:
            raise ValidationError(f"policy {text!r}: use {kind}[:gate|timer[:BUDGET]]")
        trigger = parts[1] if len(parts) > 1 else "gate"
        budget = parse_budget(parts[2]) if len(parts) > 2 else 1.0
        scope = {"guard": guard, "fleet_guard": fleet, "fleet_proof": proof, "guard_z": guard_z}
        if kind == LIVE:
            return cls(kind="system", trigger=trigger, budget=budget, live=True, **scope)
        if kind in (NO_PROTOTYPES, REFINE, CONTINUAL):
            return cls(
                kind="system",
                trigger=trigger,
                budget=budget,
                prototypes=False,
                refine=kind == REFINE,
                continual=kind == CONTINUAL,
                **scope,
            )
        return cls(kind=kind, trigger=trigger, budget=budget, **scope)


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


@config_dataclass
class ReplayConfig:
    """The replay protocol (written into every result).

    Attributes:
        quantile: time-split quantile; must equal the one the adaptor artefact was
            trained with (0.8 by default), checked by the engine.
        until_quantile: replay only the events before the time split's cut at this
            quantile (> ``quantile``; None = to the end). With an artefact trained at an
            earlier ``quantile`` this replays a **validation period** inside the usual
            training period, e.g. train at 0.6 and replay up to 0.8, to choose settings
            without reading the replay period.
        min_history: events a device needs before it is evaluated and first requests
            an edit (5, as in the generators' training; >= 2: fine-tuning needs two).
        negatives: sampled negatives per evaluated event for AUC / UAUC (100).
        seed: seeds the negatives (per (seed, user, event position)) and the bootstrap.
        workers: processes the users are split across (results do not depend on it);
            with ``ray``, the number of Ray actors.
        ray: run the per-device replay on Ray instead of spawned processes
            (:mod:`recsys.replay.ray_backend`): ``local`` (a Ray instance on this
            machine) or a Ray address (``auto``, ``HOST:6379``, ``ray://HOST:10001``);
            None: spawned processes. Results do not depend on it.
        quick: CI mode: at most ``quick_users`` users (the CLI also uses ``QUICK_BUDGETS``).
        quick_users: users kept by ``quick`` (the first in a seeded permutation).
        max_users: keep at most this many users (seeded sample; None = all).
        max_events: keep at most this many replay events per device, its first ones
            (None = all; the demo replays 40).
        gate_window: W of the shift gate (recent items compared with the anchor window).
        gate_min_gap: events between two gate requests of one device (1: any event may).
        finetune_steps / finetune_lr: each on-device fine-tuning update (Adam on the head).
        payload_dtype: downlink payload dtype ("fp16", "int8" or "fp32").
        uplink_items: recent item ids a request carries (the LM / DUET read at most 20).
        chunk_users: users processed together (fixed blocks of the sorted user list, so
            batches do not depend on the worker count).
        batch_size: events scored per batch.
        lm_batch: histories per LM generation call (within one user).
        refine: how the cloud refines edits for ``system-refine`` policies (steps, lr,
            positions; defaults chosen on held-out training users).
        slice_s: global-time replay: requests are served in slices of this much stream
            time; a slice's requests are batched and see the cloud (prototype bank,
            continual adaptor) as it was when the slice began. None: the replay
            period's span / ``GLOBAL_SLICES`` (datasets whose "time" is a position in
            the user's list get as many slices as real-time ones). 0: every request is
            its own slice (a cloud serving requests one at a time, as the gRPC
            global-time replay drives it).
        store_url: global-time replay: the prototype store the live bank writes its
            versions to (None: a fresh SQLite file in a temporary directory).
        continual: how ``system-continual`` policies' adaptor keeps learning.
        bootstrap: user-bootstrap resamples of the NDCG@10 difference CIs.
        artifact: adaptor artefact path (None: CACHE/artifacts/NAME/adaptor/adaptor.pt).
        learned_gate: the learned gate's weights for "learned" policies (None:
            ``learned_gate.npz`` beside the adaptor artefact, as ``recsys replay
            train-gate`` writes it).
        guard: the harm guard of guarded policies.
    """

    quantile: float = Field(0.8, gt=0.0, lt=1.0)
    until_quantile: float | None = Field(None, gt=0.0, lt=1.0)
    min_history: int = Field(5, ge=2)
    negatives: int = Field(100, ge=1)
    seed: int = 0
    workers: int = Field(1, ge=1)
    ray: str | None = Field(None, min_length=1)
    quick: bool = False
    quick_users: int = Field(24, ge=1)
    max_users: int | None = Field(None, ge=1)
    max_events: int | None = Field(None, ge=1)
    gate_window: int = Field(10, ge=1)
    gate_min_gap: int = Field(1, ge=1)
    finetune_steps: int = Field(5, ge=1)
    # best of 1e-2 / 3e-3 / 1e-3 on ml-100k's replay (favours the baseline)
    finetune_lr: float = Field(3e-3, gt=0.0)
    payload_dtype: Literal["fp16", "int8", "fp32"] = "fp16"
    uplink_items: int = Field(20, ge=1)
    chunk_users: int = Field(16, ge=1)
    batch_size: int = Field(256, ge=1)
    lm_batch: int = Field(64, ge=1)
    refine: RefineConfig = field(default_factory=RefineConfig)  # system-refine policies
    slice_s: float | None = Field(None, ge=0.0)
    store_url: str | None = None
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    bootstrap: int = Field(2000, ge=1)
    artifact: str | None = None
    learned_gate: str | None = None
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if self.until_quantile is not None and self.until_quantile <= self.quantile:
            raise ValueError(
                f"until_quantile ({self.until_quantile}) must be above quantile "
                f"({self.quantile}): the replay runs from the one cut to the other"
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
        """Build from a plain mapping (:meth:`to_dict`); unknown keys are an error."""
        return cls(**dict(d))


@config_dataclass
class GrpcOptions:
    """How the replay drives the real services (``run_replay(..., via="grpc")``).

    Attributes:
        concurrency: devices replayed at once (each device's events stay in order).
        startup_timeout_s: how long a server may take to become healthy.
        rpc_timeout_s: deadline of the driver's calls to a device (an edit on a cold LM
            can take long; a ``RecordEvent`` waits for the edit it triggers).
        cloud_deadline_s: the device's deadline on each call to the cloud (a late edit
            fails and the device keeps its last good one); <= ``rpc_timeout_s``.
        strict: a failed edit request aborts the replay (it would no longer match the
            in-process one); False counts it (``failed_requests``) and goes on, the
            device serving its last good edit (the demo).
        prestart: start every device server at once, beside the cloud, before the first
            policy replays (faster for a few policies, e.g. the demo; each server holds
            the ranker and the dataset); False: one at a time, each stopped after its
            policy (the first still starts while the cloud loads).
    """

    concurrency: int = Field(4, ge=1)
    startup_timeout_s: float = Field(600.0, gt=0.0)
    rpc_timeout_s: float = Field(600.0, gt=0.0)
    cloud_deadline_s: float = Field(600.0, gt=0.0)
    strict: bool = True
    prestart: bool = False

    def __post_init__(self) -> None:
        if self.cloud_deadline_s > self.rpc_timeout_s:
            raise ValueError(
                f"cloud_deadline_s ({self.cloud_deadline_s}) must be <= rpc_timeout_s "
                f"({self.rpc_timeout_s}): a RecordEvent waits for the edit it triggers"
            )
