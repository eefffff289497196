"""``recsys replay``: offline replay evaluation of every policy on the same stream.

recsys replay --dataset ml-100k --out results/replay-ml-100k [--quick] [--json PATH]
              [--via inprocess|grpc] [--seed N] [--workers N] [--budgets 100,50,20,10,5]
              [--policies static,finetune,system:gate:0.2,...] [--max-users N]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recsys.cli.common import add_json_option, add_location_options, print_table, write_json

logger = logging.getLogger(__name__)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add the top-level ``replay`` command."""
    p = groups[""].add_parser(
        "replay",
        help="offline replay: static, fine-tuning, DUET-style and the full system at several "
        "request budgets (gate vs timer) on the same stream; report with plots",
        description="Replay the time split's later period per device, in time order: at each "
        "event the device ranks the full catalogue (seen items excluded), the true item's rank "
        "gives HR@10 / NDCG@10 / MRR@10 and its AUC against sampled negatives; then the event "
        "is recorded and the policy's trigger (the shift-score gate with a threshold "
        "calibrated on the training period for the budget, or a timer) may request an edit, "
        "which serves later events only. Writes OUT/results.json, OUT/results.md and PNG plots.",
    )
    p.add_argument(
        "--dataset", default="ml-100k", help="dataset name or canonical directory (default ml-100k)"
    )
    p.add_argument("--out", required=True, help="results directory (created)")
    p.add_argument(
        "--via",
        choices=("inprocess", "grpc"),
        default="inprocess",
        help="replay in process (default, fast) or through the real gRPC services",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI mode: 24 users (seeded sample), budgets 100%% and 20%%",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of negatives, samples, bootstrap (0)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes the users are split across (results do not depend on it; default 1)",
    )
    p.add_argument(
        "--budgets",
        help="request budgets of the system policies, comma separated, as fractions or "
        "percentages (default 100,50,20,10,5; --quick: 100,20)",
    )
    p.add_argument(
        "--policies",
        help="comma-separated policies instead of the default set: static, finetune[:N], "
        "duet[:gate|timer[:BUDGET]], system[:gate|timer[:BUDGET]]",
    )
    p.add_argument("--max-users", type=int, help="replay at most this many users (seeded sample)")
    p.add_argument("--min-history", type=int, help="events before a device is evaluated (5)")
    p.add_argument("--negatives", type=int, help="sampled negatives per event for AUC (100)")
    p.add_argument("--finetune-every", type=int, help="events between fine-tuning updates (5)")
    p.add_argument("--finetune-steps", type=int, help="Adam steps per fine-tuning update (5)")
    p.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (3e-3)")
    p.add_argument("--payload", choices=("fp16", "int8", "fp32"), help="downlink dtype (fp16)")
    p.add_argument(
        "--artifact", help="adaptor artefact (default CACHE_DIR/artifacts/NAME/adaptor/adaptor.pt)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: fastest when shared)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_location_options(p)
    add_json_option(p)
    p.set_defaults(handler=cmd_replay)


def build_config(args: argparse.Namespace):
    """(ReplayConfig, policies) from the command line."""
    from recsys.errors import ValidationError
    from recsys.replay.config import (
        DEFAULT_BUDGETS,
        QUICK_BUDGETS,
        PolicySpec,
        ReplayConfig,
        default_policies,
        parse_budget,
    )

    over = {
        "min_history": args.min_history,
        "negatives": args.negatives,
        "max_users": args.max_users,
        "payload_dtype": args.payload,
        "finetune_steps": args.finetune_steps,
        "finetune_lr": args.finetune_lr,
        "artifact": args.artifact,
    }
    if args.workers is not None and args.workers < 1:
        raise ValidationError(f"--workers must be >= 1, got {args.workers}")
    cfg = ReplayConfig(
        seed=args.seed,
        workers=args.workers,
        quick=args.quick,
        **{k: v for k, v in over.items() if v is not None},
    )
    if args.policies:
        if args.budgets or args.finetune_every:
            raise ValidationError(
                "--policies already names every policy (e.g. finetune:5 or system:gate:0.2); "
                "drop --budgets and --finetune-every"
            )
        specs = [PolicySpec.parse(t) for t in args.policies.split(",") if t.strip()]
    else:
        budgets = (
            [parse_budget(b) for b in args.budgets.split(",") if b.strip()]
            if args.budgets
            else list(QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)
        )
        specs = default_policies(budgets)
        if args.via == "grpc":  # the services run static and the full system only
            specs = [s for s in specs if s.kind in ("static", "system")]
        if args.finetune_every:
            specs = [
                PolicySpec("finetune", finetune_every=args.finetune_every)
                if s.kind == "finetune"
                else s
                for s in specs
            ]
    return cfg, specs


def _driver(via: str):
    if via == "inprocess":
        from recsys.replay.engine import run_replay

        return run_replay
    try:
        from recsys.replay.grpc_driver import run_replay_grpc
    except ModuleNotFoundError as exc:
        from recsys.errors import NotFoundError

        if exc.name != "recsys.replay.grpc_driver":
            raise
        raise NotFoundError(
            "--via grpc needs recsys.replay.grpc_driver, which is not installed in this "
            "build; use --via inprocess"
        ) from None
    return run_replay_grpc


def cmd_replay(args: argparse.Namespace) -> int:
    import torch

    from recsys import settings
    from recsys.data.registry import load_dataset
    from recsys.errors import ValidationError
    from recsys.replay.report import (
        bullets,
        cost_rows,
        gate_rows,
        goal_lines,
        header_line,
        quality_rows,
        summarise,
        write_report,
    )

    if args.threads < 1:
        raise ValidationError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    cfg, specs = build_config(args)
    cache = settings.cache_dir(args.cache_dir)
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    run = _driver(args.via)(ds, cfg, specs, cache=cache, progress=not args.no_progress)
    summary = summarise(run)
    summary["meta"]["via"] = args.via
    print(header_line(summary))
    print_table(quality_rows(summary), title="Quality: full-catalogue ranking, seen items excluded")
    print_table(cost_rows(summary), title="Cost per policy (device compute = edit updates only)")
    rows = gate_rows(summary)
    if rows:
        print_table(rows, title="Request gate: threshold calibrated once on the training period")
    print("\nTargets (as measured):")
    lines = bullets(goal_lines(summary))
    for line in lines:
        print(line)
    if not lines:
        print("- not applicable: the targets compare static, finetune and system gate 100%/10%")
    out = Path(args.out)
    paths = write_report(summary, out)
    print(
        f"\nwrote {', '.join(p.name for p in paths.values())} to {out} "
        f"({run.meta['seconds']['total']:.0f} s)"
    )
    write_json(args.json, summary)
    return 0
