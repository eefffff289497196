"""The ``recsys`` command line.

Each command group lives in its own module under ``recsys.cli`` and exposes
``register(groups)``; heavy imports happen inside the command functions, so
``recsys --help`` stays fast. Domain errors become a one-line message and exit code 2.
What reaches stderr (quiet by default, ``-v`` for more) is set in :mod:`recsys.cli.quiet`.

Exit codes: 0 success, 1 unexpected failure, 2 bad input / domain error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from recsys.cli import quiet
from recsys.errors import RecsysError

logger = logging.getLogger(__name__)

# Command groups (``recsys GROUP COMMAND``) and the modules that add commands to them.
GROUPS = {
    "data": "prepare, inspect and fetch datasets",
    "features": "compute item feature matrices",
    "train": "train models (ranker, codebook, lm, llm, adaptor)",
    "bench": "benchmarks that print tables and write --json",
    "eval": "offline evaluations",
    "serve": "run the gRPC services",
    "db": "prototype store database",
    "abtest": "A/B test harness",
    "llm": "pretrained LLMs packaged in wheels: import, list",
    "auth": "keys and signed device tokens of the gRPC services",
}
COMMAND_MODULES = (
    "recsys.cli.data_cmd",
    "recsys.cli.features_cmd",
    "recsys.cli.demo_cmd",
    "recsys.cli.ranker_cmd",
    "recsys.cli.codebook_cmd",
    "recsys.cli.adaptor_cmd",
    "recsys.cli.llm_cmd",
    "recsys.cli.align_cmd",
    "recsys.cli.llm_serve_cmd",
    "recsys.cli.llm_bench_cmd",
    "recsys.cli.llm_import_cmd",
    "recsys.cli.db_cmd",
    "recsys.cli.payload_cmd",
    "recsys.cli.serve_cmd",
    "recsys.cli.soak_cmd",
    "recsys.cli.auth_cmd",
    "recsys.cli.scale_cmd",
    "recsys.cli.replay_cmd",
    "recsys.cli.abtest_cmd",
)

Handler = Callable[[argparse.Namespace], int]


class CommandGroups(dict[str, argparse._SubParsersAction]):
    """What each module's ``register(groups)`` receives: ``groups[NAME]`` is the
    sub-command list of ``recsys NAME`` (a :data:`GROUPS` key), created on first use, so
    a group no module fills never exists and ``--help`` lists only groups with commands;
    ``groups[""]`` is the top level (``recsys demo``)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self[""] = parser.add_subparsers(dest="command", metavar="COMMAND")

    def __missing__(self, name: str) -> argparse._SubParsersAction:
        if name not in GROUPS:
            raise KeyError(f"unknown command group {name!r}; add it to recsys.cli.GROUPS")
        help_text = GROUPS[name]
        group_parser = self[""].add_parser(name, help=help_text, description=help_text)
        group_parser.set_defaults(_group_parser=group_parser)
        action = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        self[name] = action
        return action


def build_parser() -> argparse.ArgumentParser:
    """The full ``recsys`` parser: every module of :data:`COMMAND_MODULES` registers its
    commands; groups appear in the order modules first use them."""
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Backpropagation-free on-device recommendation with cloud-generated edits.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging: -v every package's INFO lines (third-party ones included), "
        "-vv debug (default: warnings, progress bars and results only)",
    )
    groups = CommandGroups(parser)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet.configure(args.verbose)  # before any command imports torch, transformers, ...
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except RecsysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
