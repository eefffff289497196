"""``--config FILE.toml``: a command's options from a TOML file, flags overriding it.

:func:`add_config_option` gives a command (``recsys serve cloud``, ``recsys serve
device``) a ``--config`` option. The file holds the command's long options as top-level
keys, spelled like the flag without its dashes and with ``_`` for ``-``
(``--batch-wait-ms 5`` is ``batch_wait_ms = 5``, ``--no-write-behind`` is
``no_write_behind = true``, a repeatable flag such as ``--auth-key`` takes a list), so
every option the flags have is available in the file, and nothing else is.

The file is validated before anything runs, by a pydantic model derived from the
command's own options (:func:`options_model`) through the same layer as the experiment
files (:func:`recsys.validation.validate_model`): an unknown key, a wrong type (no
``"5"`` for a number, no ``1`` for a switch) or a value outside a flag's choices is one
line naming the file and the key, e.g. ``cloud.toml: batch_max: Input should be a valid
integer (got 'x')``, and the command exits with code 2. Ranges are then checked by the
service's config classes, as for flags.

Precedence: a flag given on the command line > the file > the flag's default. (The file's
values are put in the namespace before the command line is parsed, and argparse never
overwrites a value already there with a default; a repeatable flag given on the command
line replaces the file's list.) Relative paths in the file are relative to the working
directory, as on the command line.

Example::

    p = sub.add_parser("cloud"); ...options...
    add_config_option(p)
    # recsys serve cloud --config examples/cloud.toml --port 6000
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict

from recsys.errors import RecsysError
from recsys.validation import validate_model

_SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._CountAction)
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


def option_key(action: argparse.Action) -> str | None:
    """The file key of an option: its first long flag without ``--``, ``-`` -> ``_``
    (None for positionals, help, and the config option itself)."""
    if isinstance(action, _SKIP) or not action.option_strings or action.dest == "config":
        return None
    long = [o for o in action.option_strings if o.startswith("--")]
    return long[0][2:].replace("-", "_") if long else None


def _value_type(action: argparse.Action) -> Any:
    """The file type of one option's value (choices -> Literal, type -> int / float / str)."""
    if action.choices is not None:
        return Literal[tuple(action.choices)]  # type: ignore[valid-type]
    kind = action.type if action.type in (int, float, str) else str
    return kind


def _field_type(action: argparse.Action) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return bool
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        return list[_value_type(action)]
    if isinstance(action, argparse._StoreConstAction):
        return bool  # a switch storing a constant: true = given
    return _value_type(action)


def options_model(parser: argparse.ArgumentParser, name: str) -> type[pydantic.BaseModel]:
    """A strict pydantic model with one optional field per long option of ``parser``
    (every key optional, unknown keys refused)."""
    fields: dict[str, Any] = {}
    for action in parser._actions:
        key = option_key(action)
        if key is not None:
            fields[key] = (_field_type(action) | None, None)
    return pydantic.create_model(name, __config__=_STRICT, **fields)


def _actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {key: a for a in parser._actions if (key := option_key(a)) is not None}


def read_config(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's values validated against ``parser``'s options, by option ``dest``.

    Raises:
        ConfigFileError: a missing or unreadable file, invalid TOML, an unknown key, a
            wrong type or a value outside the choices (the message names file and key).
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigFileError(f"{p}: config file not found") from None
    except OSError as exc:
        raise ConfigFileError(f"{p}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{p}: not UTF-8 text ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{p}: invalid TOML ({exc})") from None
    model = options_model(parser, f"{parser.prog} config")
    try:
        validated = validate_model(model, data, str(p))
    except RecsysError as exc:
        raise ConfigFileError(str(exc)) from None
    actions = _actions_by_key(parser)
    out: dict[str, Any] = {}
    for key in validated.model_fields_set:
        value, action = getattr(validated, key), actions[key]
        if isinstance(action, argparse._StoreConstAction) and not isinstance(
            action, (argparse._StoreTrueAction, argparse._StoreFalseAction)
        ):
            value = action.const if value else action.default
        elif isinstance(action, argparse._StoreFalseAction):
            value = not value  # ``flag = true`` means the flag was given
        out[action.dest] = list(value) if isinstance(value, list) else value
    return out


class ConfigFileError(RecsysError):
    """A config file that cannot be used (the message names the file and the key)."""


def _config_path(args: Sequence[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(args))
    return known.config


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` a ``--config FILE.toml`` option whose values sit between the
    command line and the defaults (see the module docstring). A bad file exits with
    code 2 and one line naming the file and the key."""
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read options from a TOML file: the long options without '--', '-' as '_' "
        "(batch_max = 32, no_write_behind = true); flags given here override the file",
    )
    parse = parser.parse_known_args
    appended = [a for a in parser._actions if isinstance(a, argparse._AppendAction)]

    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        path = _config_path(argv)
        if path is None:
            return parse(argv, namespace)
        try:
            values = read_config(path, parser)
        except ConfigFileError as exc:
            parser.exit(2, f"error: {exc}\n")
        ns = namespace if namespace is not None else argparse.Namespace()
        later = {a.dest: values.pop(a.dest) for a in appended if a.dest in values}
        for dest, value in values.items():
            if not hasattr(ns, dest):
                setattr(ns, dest, value)
        ns, extra = parse(argv, ns)
        for action in appended:  # a repeatable flag on the command line replaces the list
            if action.dest in later and getattr(ns, action.dest) is action.default:
                setattr(ns, action.dest, later[action.dest])
        return ns, extra

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


__all__ = ["ConfigFileError", "add_config_option", "options_model", "read_config"]
