"""Validated configuration classes: pydantic v2 dataclasses that fail with the project's
:class:`recsys.errors.ValidationError`.

Config objects (training, replay, serving, experiments) declare their ranges with
``pydantic.Field`` (``ge``, ``le``, ``gt``, ``pattern``, ``Literal``), so a bad value is
rejected at construction with a message naming the class, the field, the bad value and
the allowed range. They stay plain dataclasses for everything else
(``dataclasses.asdict``, ``dataclasses.replace`` (which validates again), ``==``).
Cross-field rules go in ``__post_init__`` and raise ``ValueError``; they are reported the
same way. Number fields are strict: a bool, a string or (for an integer field) a float is
refused rather than coerced.

Example::

    from pydantic import Field
    from recsys.validation import config_dataclass

    @config_dataclass
    class GateConfig:
        window: int = Field(10, ge=1)      # events per shift-score window
        budget: float = Field(0.2, gt=0, le=1)

    GateConfig(window=0)
    # ValidationError: GateConfig: window: Input should be greater than or equal to 1 (got 0)
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform

import pydantic
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from recsys.errors import ValidationError

T = TypeVar("T", bound=type)

_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_default=False)


def format_errors(
    title: str, err: pydantic.ValidationError, positional: tuple[str, ...] = ()
) -> str:
    """One line per problem: ``title: field.sub: message (got value)``; ``positional``
    names the fields of positional arguments (pydantic reports their index)."""
    parts = []
    for e in err.errors(include_url=False):
        path = list(e.get("loc", ()))
        if path and isinstance(path[0], int) and path[0] < len(positional):
            path[0] = positional[path[0]]
        loc = ".".join(str(x) for x in path)
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:  # a cross-field rule (``__post_init__``): its message says it all
            parts.append(msg)
            continue
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e.get("type") == "missing" else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{shown}")
    return f"{title}: " + "; ".join(parts)


def _number_kinds(tp: Any) -> frozenset[type] | None:
    """``{int}``, ``{float}`` or both when ``tp`` is a number type (or an Optional of one)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    kinds = frozenset(a for a in (typing.get_args(tp) if union else (tp,)) if a is not type(None))
    return kinds if kinds and kinds <= {int, float} else None


def _hints(c: type) -> dict[str, Any]:
    """Field annotations of ``c`` resolved; when a name cannot be resolved yet (a type
    defined later in its module), the plain number annotations still are."""
    try:
        return typing.get_type_hints(c)
    except NameError:
        plain = {"int": int, "float": float, "int | None": int | None, "float | None": float | None}
        return {
            n: plain.get(a, a) if isinstance(a, str) else a for n, a in c.__annotations__.items()
        }


def _strict_numbers(title: str, kinds: dict[str, frozenset[type]], values: dict[str, Any]) -> None:
    """Refuse what pydantic's lax mode would coerce into a number field: a bool, a string,
    or a float for an integer field (``epochs=2.0``, ``budget=True``, ``workers="2"``)."""
    bad = []
    for name, value in values.items():
        want = kinds.get(name)
        if want is None or value is None:
            continue
        integer = want == {int}
        if isinstance(value, (bool, str)) or (integer and isinstance(value, float)):
            bad.append(
                f"{name}: expected {'an integer' if integer else 'a number'} (got {value!r})"
            )
    if bad:
        raise ValidationError(f"{title}: " + "; ".join(bad))


@dataclass_transform(field_specifiers=(Field,))
def config_dataclass(cls: T | None = None, *, frozen: bool = True) -> T | Callable[[T], T]:
    """Decorator: ``cls`` as a validated, by default frozen, pydantic dataclass whose
    errors are :class:`ValidationError` (see the module docstring)."""

    def wrap(c: T) -> T:
        dc = _pydantic_dataclass(c, frozen=frozen, config=_CONFIG)
        init = dc.__init__
        names = tuple(f.name for f in dataclasses.fields(dc))
        kinds = {n: k for n in names if (k := _number_kinds(_hints(c).get(n))) is not None}

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            _strict_numbers(c.__name__, kinds, {**dict(zip(names, args, strict=False)), **kwargs})
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as err:
                raise ValidationError(format_errors(c.__name__, err, names)) from None

        dc.__init__ = __init__
        return dc

    return wrap if cls is None else wrap(cls)


def validate_model(model: type[pydantic.BaseModel], data: Any, title: str) -> Any:
    """``model.model_validate(data)`` with :class:`ValidationError` naming ``title``
    (e.g. the file a TOML table came from)."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise ValidationError(format_errors(title, err)) from None


__all__ = ["Field", "config_dataclass", "format_errors", "validate_model"]
