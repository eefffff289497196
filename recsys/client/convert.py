"""Protobuf replies -> the client's dataclasses (:mod:`recsys.client.results`).

Fields are copied by name (repeated fields become tuples); enums map by their name
without the type prefix (``SERVING_MODE_EDITED`` -> :attr:`ServingMode.EDITED`); unset
sub-messages become None.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from recsys.client import results as r

T = TypeVar("T")


def _plain(cls: type[T], msg: Any, **override: Any) -> T:
    """``cls`` from the same-named fields of ``msg`` (repeated -> tuple), then ``override``."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in override:
            continue
        v = getattr(msg, f.name)
        values[f.name] = tuple(v) if hasattr(v, "__len__") and not isinstance(v, str | bytes) else v
    return cls(**values, **override)


def _sub(msg: Any, name: str) -> Any | None:
    return getattr(msg, name) if msg.HasField(name) else None


def serving_mode(value: int, pb: Any) -> r.ServingMode:
    return r.ServingMode[pb.ServingMode.Name(value).removeprefix("SERVING_MODE_")]


def edit_outcome(value: int, pb: Any) -> r.EditOutcome:
    return r.EditOutcome[pb.EditOutcome.Name(value).removeprefix("EDIT_OUTCOME_")]


def edit_ref(msg: Any, name: str = "edit") -> r.EditRef | None:
    sub = _sub(msg, name)
    return None if sub is None else _plain(r.EditRef, sub)


def edit_cost(msg: Any) -> r.EditCost | None:
    sub = _sub(msg, "cost")
    return None if sub is None else _plain(r.EditCost, sub)


def recommendation(msg: Any, pb: Any) -> r.Recommendation:
    return _plain(
        r.Recommendation, msg,
        items=tuple(r.ScoredItem(i.item_id, i.score) for i in msg.items),
        mode=serving_mode(msg.mode, pb), edit=edit_ref(msg),
    )  # fmt: skip


def _edit_fields(msg: Any, pb: Any) -> dict[str, Any]:
    """The fields RecordEvent and RequestEdit replies share that need converting: the
    outcome and mode enums, the active edit and the request's cost."""
    return dict(
        outcome=edit_outcome(msg.outcome, pb), mode=serving_mode(msg.mode, pb),
        edit=edit_ref(msg), cost=edit_cost(msg),
    )  # fmt: skip


def event_result(msg: Any, pb: Any) -> r.EventResult:
    return _plain(r.EventResult, msg, **_edit_fields(msg, pb))


def edit_request_result(msg: Any, pb: Any) -> r.EditRequestResult:
    return _plain(r.EditRequestResult, msg, **_edit_fields(msg, pb))


def applied_edit(msg: Any, pb: Any) -> r.AppliedEdit:
    return r.AppliedEdit(edit=edit_ref(msg), mode=serving_mode(msg.mode, pb))


def device_status(msg: Any, pb: Any) -> r.DeviceStatus:
    user = _sub(msg, "user")
    if user is not None:
        user = _plain(r.UserStatus, user, mode=serving_mode(user.mode, pb), edit=edit_ref(user))
    return _plain(r.DeviceStatus, msg, user=user)


def prototype_ref(msg: Any, name: str) -> r.PrototypeRef | None:
    sub = _sub(msg, name)
    return None if sub is None else _plain(r.PrototypeRef, sub)


def prototype(msg: Any) -> r.Prototype:
    return _plain(r.Prototype, msg, ref=prototype_ref(msg, "ref"))


def generated_edit(msg: Any) -> r.GeneratedEdit:
    proto = _sub(msg, "prototype")
    return _plain(
        r.GeneratedEdit, msg,
        prototype_ref=prototype_ref(msg, "prototype_ref"),
        prototype=None if proto is None else prototype(proto),
    )  # fmt: skip


def prototype_entries(msg: Any) -> list[r.PrototypeEntry]:
    return [_plain(r.PrototypeEntry, e) for e in msg.prototypes]
