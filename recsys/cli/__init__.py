"""The ``recsys`` command line.

Each command group lives in its own module under ``recsys.cli`` and exposes
``register(groups)``; heavy imports happen inside the command functions, so
``recsys --help`` stays fast. Domain errors become a one-line message and exit code 2.

Exit codes: 0 success, 1 unexpected failure, 2 bad input / domain error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from recsys.errors import RecsysError

logger = logging.getLogger(__name__)

# Command groups (``recsys GROUP COMMAND``) and the modules that add commands to them.
GROUPS = {
    "data": "prepare, inspect and fetch datasets",
    "features": "compute item feature matrices",
    "train": "train models (ranker, codebook, lm, adaptor)",
    "bench": "benchmarks that print tables and write --json",
    "eval": "offline evaluations",
    "serve": "run the gRPC services",
    "db": "prototype store database",
    "abtest": "A/B test harness",
}
COMMAND_MODULES = (
    "recsys.cli.data_cmd",
    "recsys.cli.features_cmd",
    "recsys.cli.demo_cmd",
    "recsys.cli.ranker_cmd",
    "recsys.cli.codebook_cmd",
    "recsys.cli.adaptor_cmd",
    "recsys.cli.llm_cmd",
    "recsys.cli.db_cmd",
    "recsys.cli.serve_cmd",
    "recsys.cli.replay_cmd",
    "recsys.cli.abtest_cmd",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Backpropagation-free on-device recommendation with cloud-generated edits.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {"": top}
    for name, help_text in GROUPS.items():
        group_parser = top.add_parser(name, help=help_text, description=help_text)
        groups[name] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        group_parser.set_defaults(_group_parser=group_parser)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(groups)
    # drop groups that no module filled, so --help lists only what works
    for name in list(GROUPS):
        if not groups[name].choices:
            top._name_parser_map.pop(name, None)
            top._choices_actions = [a for a in top._choices_actions if a.dest != name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + 1, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # faiss logs every optional CPU-feature library it tries (AVX512, ...) at INFO
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
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
