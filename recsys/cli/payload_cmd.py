"""``recsys bench payload``: the RSE1 edit payload against safetensors and protobuf.

recsys bench payload [--runs N] [--trials N] [--seed S] [--json out.json]
"""

from __future__ import annotations

import argparse

from recsys.cli.common import add_command, add_json_option, add_seed_option
from recsys.reporting import write_json


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``payload`` to the ``bench`` group."""
    p = add_command(
        groups["bench"],
        "payload",
        cmd_bench,
        help="edit payload codecs: RSE1 vs safetensors vs protobuf (size, speed, validation)",
        description="Encode and decode a rank-8 edit of the default head with each codec at "
        "fp16 and int8: bytes on the wire, median encode / decode time, and the share of "
        "random single-bit flips and truncations each decoder refuses, plus whether it "
        "refuses NaN, a wrong shape and a wrong dtype.",
    )
    p.add_argument("--runs", type=int, default=1000, help="timed calls per figure (default 1000)")
    p.add_argument(
        "--trials", type=int, default=400, help="bit flips / truncations tried (default 400)"
    )
    add_seed_option(p, help="edit values and corruption positions (default 0)")
    add_json_option(p)


def cmd_bench(args: argparse.Namespace) -> int:
    from recsys.edit_payload_bench import print_payload_table, run_payload_benchmark

    result = run_payload_benchmark(runs=args.runs, trials=args.trials, seed=args.seed)
    print_payload_table(result)
    write_json(args.json, result)
    return 0
