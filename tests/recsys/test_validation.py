"""recsys.validation: pydantic dataclasses that fail with the project's ValidationError."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import BaseModel, ConfigDict, Field

from recsys.errors import ValidationError
from recsys.validation import config_dataclass, validate_model


@config_dataclass
class _Cfg:
    window: int = Field(10, ge=1)
    budget: float = Field(0.2, gt=0, le=1)

    def __post_init__(self) -> None:
        if self.window > 100 and self.budget > 0.5:
            raise ValueError("window > 100 needs budget <= 0.5")


def test_defaults_asdict_replace_and_frozen() -> None:
    c = _Cfg()
    assert dataclasses.asdict(c) == {"window": 10, "budget": 0.2}
    assert dataclasses.replace(c, window=3) == _Cfg(window=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.window = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"window": 0}, "_Cfg: window: Input should be greater than or equal to 1 (got 0)"),
        ({"budget": 2.0}, "budget: Input should be less than or equal to 1 (got 2.0)"),
        ({"window": "x"}, "window: expected an integer (got 'x')"),
        ({"colour": 1}, "colour: Unexpected keyword argument"),
        ({"window": 200, "budget": 0.9}, "_Cfg: window > 100 needs budget <= 0.5"),
    ],
)
def test_bad_values_raise_the_domain_error_naming_the_field(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        _Cfg(**kwargs)
    assert needle in str(err.value)


def test_replace_validates_again() -> None:
    with pytest.raises(ValidationError, match="window"):
        dataclasses.replace(_Cfg(), window=-1)


def test_validate_model_names_the_source() -> None:
    class Table(BaseModel):
        model_config = ConfigDict(extra="forbid")
        salt: str = Field(min_length=1)

    assert validate_model(Table, {"salt": "s"}, "exp.toml [experiment]").salt == "s"
    with pytest.raises(ValidationError, match=r"exp.toml \[experiment\]: salt: String should"):
        validate_model(Table, {"salt": ""}, "exp.toml [experiment]")


def test_positional_arguments_are_named_by_their_field() -> None:
    with pytest.raises(ValidationError, match=r"_Cfg: budget: Input should be greater than 0"):
        _Cfg(5, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"window": True}, "window: expected an integer (got True)"),
        ({"window": 2.0}, "window: expected an integer (got 2.0)"),
        ({"window": "3"}, "window: expected an integer (got '3')"),
        ({"budget": True}, "budget: expected a number (got True)"),
    ],
)
def test_number_fields_refuse_bools_strings_and_floats_for_integers(kwargs, needle) -> None:
    with pytest.raises(ValidationError) as err:
        _Cfg(**kwargs)
    assert needle in str(err.value)
    assert _Cfg(budget=1).budget == 1  # an integer is a number
