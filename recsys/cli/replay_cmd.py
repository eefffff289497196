"""``recsys replay``: offline replay evaluation of every policy on the same stream.

recsys replay --dataset ml-100k --out results/replay-ml-100k [--quick] [--json PATH]
              [--via inprocess|grpc] [--seed N] [--workers N] [--ray [ADDRESS|local]]
              [--budgets 100,50,20,10,5]
              [--policies static,finetune,system:gate:0.2,...] [--max-users N]
recsys replay --dataset ml-100k --parity [--max-users 20] [--json PATH]
recsys replay --dataset ml-100k --live-experiment FILE --event-log LOG [--max-users 20]
recsys replay compare --run LABEL=OUT [--run LABEL=OUT ...] --policy "system gate 20%"
                      [--reference LABEL | POLICY@LABEL ...] [--json PATH]
recsys replay train-gate --dataset ml-100k [--artifact PATH] [--out PATH] [--horizon 10]
                         [--budgets 50,20,10,5] [--json PATH]

Every replay mode calls the replay core (:func:`recsys.replay.engine.run_replay`);
``compare`` reads the ``per_user.json`` of earlier ``--out`` runs
(:mod:`recsys.replay.compare`); ``train-gate`` trains the learned request gate on the
training period (:mod:`recsys.replay.gate_training`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recsys.cli.common import add_json_option, add_location_options
from recsys.reporting import print_table, write_json

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
        "which serves later events only. Writes OUT/results.json, OUT/results.md and PNG plots. "
        "--parity runs the same replay in process and through the services and compares them; "
        "--live-experiment sends the users through one device server serving an experiment. "
        "`recsys replay compare` pairs the runs of several artefacts user by user.",
    )
    p.add_argument(
        "--dataset", default="ml-100k", help="dataset name or canonical directory (default ml-100k)"
    )
    # one of the three is required unless `recsys replay compare` runs (checked in cmd_replay)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--out",
        help="results directory (created): the report mode (results.json, results.md, "
        "per_user.json with every policy's per-user NDCG@10, plots)",
    )
    mode.add_argument(
        "--parity",
        action="store_true",
        help="replay in process and through the gRPC services, print the per-policy "
        "differences and costs side by side (default 20 users; policies "
        "static,system:gate:0.2,system:timer:0.2)",
    )
    mode.add_argument(
        "--live-experiment",
        metavar="FILE",
        help="live A/B traffic: the users through ONE device server serving the experiment "
        "TOML (with --event-log; default 20 users); then `recsys abtest analyze --events LOG "
        "--experiment FILE`",
    )
    p.add_argument("--event-log", metavar="LOG", help="the device's event log (--live-experiment)")
    p.add_argument(
        "--via",
        choices=("inprocess", "grpc"),
        default="inprocess",
        help="replay in process (default, fast) or through the real gRPC services",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="users replayed at once through the services (--via grpc, --parity, "
        "--live-experiment; default 4)",
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
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="replay the devices on Ray, --workers actors (extra: pip install -e .[ray]): "
        "'local' (the default when ADDRESS is left out) starts Ray on this machine, else a "
        "cluster address (auto, HOST:6379, ray://HOST:10001); same results as --workers",
    )
    p.add_argument(
        "--budgets",
        help="request budgets of the system policies, comma separated, as fractions or "
        "percentages (default 100,50,20,10,5; --quick: 100,20)",
    )
    p.add_argument(
        "--policies",
        help="comma-separated policies instead of the default set: static, finetune[:N], "
        "duet[:gate|timer[:BUDGET]], system[:gate|timer[:BUDGET]], system-noproto[...] (the "
        "adaptor's own edit, no prototypes), system-refine[...] (that edit refined in the "
        "cloud; in process only), system-live[...] (prototypes refined online) and "
        "system-continual[...] (an adaptor that keeps learning from the uplinks): these "
        "two run in global stream time, in process only. Triggers: gate (shift score), "
        "learned (the learned gate of `recsys replay train-gate`), timer; a last :guard puts "
        "the device's harm guard in front, :fleet-guard the cloud's pooled one (e.g. "
        "system:learned:0.1, system:timer:1.0:guard, system:timer:0.1:fleet-guard)",
    )
    p.add_argument(
        "--learned-gate",
        metavar="PATH",
        help="the learned gate's weights for learned policies (default: STEM.learned_gate.npz "
        "beside the adaptor artefact, where `recsys replay train-gate` writes it)",
    )
    p.add_argument(
        "--guard-window",
        type=int,
        help="harm guard: the user's last clicks its evidence averages (20)",
    )
    p.add_argument(
        "--guard-margin",
        type=float,
        help="harm guard: how much worse than the base head (mean DCG per click) the user's "
        "earlier edits may be and the new one still applied (0)",
    )
    p.add_argument(
        "--guard-z",
        type=float,
        help="harm guard: keep an edit out only if the evidence is below -margin by this many "
        "standard errors (1.645, a one-sided test at 5%%; 0: on the mean alone)",
    )
    p.add_argument(
        "--store-url",
        help="global time (system-live): the prototype store the live bank writes its "
        "versions to, e.g. postgresql+psycopg://user@host/db (default: a temporary SQLite file)",
    )
    p.add_argument(
        "--slice-seconds",
        type=float,
        help="global time: stream seconds of one batched slice of requests (default: the "
        "replay period's span / 200)",
    )
    p.add_argument(
        "--continual-every",
        type=float,
        help="global time (system-continual): stream seconds between adaptor refreshes "
        "(default: the replay period's span / 10)",
    )
    p.add_argument(
        "--max-users",
        type=int,
        help="replay at most this many users (seeded sample; --parity / --live-experiment: 20)",
    )
    p.add_argument("--max-events", type=int, help="replay each device's first N events only")
    p.add_argument(
        "--quantile",
        type=float,
        help="time split of the adaptor artefact (0.8; `recsys train adaptor --quantile`)",
    )
    p.add_argument(
        "--until-quantile",
        type=float,
        help="replay only the events before the cut at this quantile: with an artefact "
        "trained at an earlier --quantile, a validation period inside the training period",
    )
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
    p.set_defaults(handler=cmd_replay, _replay_parser=p)
    _register_compare(p)


def _register_compare(parent: argparse.ArgumentParser) -> None:
    """``recsys replay compare``: one policy across several replays, paired per user."""
    sub = parent.add_subparsers(dest="replay_command", metavar="{compare,train-gate}")
    _register_train_gate(sub)
    p = sub.add_parser(
        "compare",
        help="compare one policy across several `recsys replay --out` runs (e.g. adaptors "
        "with different token sources) on the same users, with paired user-bootstrap CIs",
        description="Load the per_user.json of several replay OUT directories, check that "
        "they replayed the same dataset version, seed, stream, users and settings (only the "
        "artefact may differ), and print per arm the event-averaged NDCG@10 and per "
        "(arm, reference) the NDCG@10 difference with its paired user-bootstrap 95% CI "
        "(the estimator of the replay report's own comparisons).",
    )
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="LABEL=OUT",
        help="a replay OUT directory and the arm label it gets (repeat: one per artefact)",
    )
    p.add_argument(
        "--policy",
        required=True,
        help="the policy label compared, present in every run (e.g. 'system gate 20%%')",
    )
    p.add_argument(
        "--reference",
        action="append",
        metavar="LABEL|POLICY@LABEL",
        help="what the arms are compared to (repeat): a run label (its --policy), or "
        "POLICY@LABEL, another policy of that run, added as an arm (e.g. duet@scratch, "
        "static@scratch; a kind picks the policy with --policy's trigger and budget); "
        "default: the first run",
    )
    p.add_argument("--resamples", type=int, help="bootstrap resamples (default: the runs')")
    p.add_argument(
        "--allow-config-diff",
        action="store_true",
        help="compare runs replayed with different settings (listed in the output)",
    )
    add_json_option(p)
    p.set_defaults(handler=cmd_compare)


def _register_train_gate(sub: argparse._SubParsersAction) -> None:
    """``recsys replay train-gate``: the learned request gate, on the training period."""
    p = sub.add_parser(
        "train-gate",
        help="train the learned request gate (predicted gain of a fresh edit) on the "
        "training period and calibrate its threshold per budget",
        description="Sample (user, history length, age of the held edit) on the time split's "
        "training period, label each with the next-window NDCG@10 (or DCG) gain of a fresh "
        "full-system edit over the held one, choose the model (linear or one hidden layer, "
        "label, weight decay) on held-out TRAINING users, refit, calibrate the threshold of "
        "each budget by simulating the gate over the training period, and write plain numpy "
        "weights (.npz) that the device loads without cloud packages.",
    )
    p.add_argument("--dataset", default="ml-100k", help="dataset name or directory (ml-100k)")
    p.add_argument("--artifact", help="adaptor artefact (default CACHE_DIR/.../adaptor.pt)")
    p.add_argument(
        "--out", help="weights file (default: STEM.learned_gate.npz beside the artefact)"
    )
    p.add_argument("--horizon", type=int, default=10, help="events the label averages (10)")
    p.add_argument("--samples-per-user", type=int, default=8, help="samples per user (8)")
    p.add_argument("--max-age", type=int, default=40, help="largest age of the held edit (40)")
    p.add_argument("--max-users", type=int, help="a seeded sample of training users (all)")
    p.add_argument(
        "--min-history",
        type=int,
        default=5,
        help="first request / shortest sampled history (5, the replay's; lower it only for "
        "datasets whose training period is too short to sample H events after it)",
    )
    p.add_argument("--budgets", default="50,20,10,5", help="budgets to calibrate (50,20,10,5)")
    p.add_argument("--seed", type=int, default=0, help="sampling / split / init seed (0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_location_options(p)
    add_json_option(p)
    p.set_defaults(handler=cmd_train_gate)


def cmd_train_gate(args: argparse.Namespace) -> int:
    import torch

    from recsys import settings
    from recsys.data.registry import load_dataset
    from recsys.replay.config import ReplayConfig, parse_budget
    from recsys.replay.engine import learned_gate_path, resolve_artifact
    from recsys.replay.gate_data import GateDataConfig
    from recsys.replay.gate_training import GateTrainConfig, train_gate

    torch.set_num_threads(max(1, args.threads))
    cache = settings.cache_dir(args.cache_dir)
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    rcfg = ReplayConfig(artifact=args.artifact)
    art_path = resolve_artifact(ds, rcfg, cache)
    out = Path(args.out) if args.out else learned_gate_path(ds, rcfg, art_path)
    cfg = GateTrainConfig(
        data=GateDataConfig(
            horizon=args.horizon,
            samples_per_user=args.samples_per_user,
            max_age=args.max_age,
            max_users=args.max_users,
            min_history=args.min_history,
            seed=args.seed,
        ),
        budgets=tuple(parse_budget(b) for b in args.budgets.split(",") if b.strip()),
        seed=args.seed,
    )
    res = train_gate(art_path, cache, ds, cfg, out, progress=not args.no_progress)
    print(
        f"{ds.name}: {res['samples']:,} samples of {res['users']:,} training users, mean "
        f"gain NDCG@10 {res['label_mean']['ndcg']:+.5f}, DCG {res['label_mean']['dcg']:+.5f} "
        f"({res['seconds']['total']:.0f} s)"
    )
    print_table(
        [
            {
                k: (f"{v:+.5f}" if isinstance(v, float) and k.startswith("heldout") else v)
                for k, v in row.items()
            }
            for row in res["candidates"]
        ],
        title="Candidates on held-out training users (mean NDCG@10 gain of the top 5/10/20/50 %)",
    )
    print(f"selected: {res['selected']}")
    print_table(
        [
            {"budget": b, "threshold": f"{t:.6f}", "training rate": f"{res['train_rates'][b]:.4f}"}
            for b, t in res["thresholds"].items()
        ],
        title="Thresholds calibrated on the training period",
    )
    print(f"wrote {out.name}")
    res["config"] = res["config"].__dict__ | {"data": cfg.data.__dict__}
    write_json(args.json, res)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from recsys.errors import ValidationError
    from recsys.replay.compare import (
        arm_rows,
        compare_runs,
        comparison_rows,
        header_line,
        load_run,
        parse_run,
    )

    if args.resamples is not None and args.resamples < 1:
        raise ValidationError(f"--resamples must be >= 1, got {args.resamples}")
    runs = [load_run(*parse_run(text)) for text in args.run]
    res = compare_runs(
        runs,
        args.policy,
        args.reference or (),
        resamples=args.resamples,
        allow_config_diff=args.allow_config_diff,
    )
    print(header_line(res))
    for label, diffs in res["config_differences"].items():
        print(f"note: run {label!r} differs from {runs[0].label!r} in: {'; '.join(diffs)}")
    print_table(arm_rows(res), title=f"Arms: {res['policy']} in each run, plus the references")
    print_table(
        comparison_rows(res),
        title="Paired NDCG@10 differences (user-bootstrap 95% CIs over the same users)",
    )
    write_json(args.json, res)
    return 0


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
    from recsys.replay.parity import DEFAULT_POLICIES, DEFAULT_USERS

    services_mode = args.parity or args.live_experiment
    max_users = args.max_users
    if max_users is None and services_mode:
        max_users = DEFAULT_USERS
    over = {
        "min_history": args.min_history,
        "negatives": args.negatives,
        "max_users": max_users,
        "max_events": args.max_events,
        "quantile": args.quantile,
        "until_quantile": args.until_quantile,
        "payload_dtype": args.payload,
        "finetune_steps": args.finetune_steps,
        "finetune_lr": args.finetune_lr,
        "artifact": args.artifact,
        "learned_gate": args.learned_gate,
        "store_url": args.store_url,
        "ray": args.ray,
        "slice_s": args.slice_seconds,
    }
    if args.workers is not None and args.workers < 1:
        raise ValidationError(f"--workers must be >= 1, got {args.workers}")
    if args.ray is not None and (args.via == "grpc" or args.parity or args.live_experiment):
        raise ValidationError(
            "--ray runs the in-process replay only (not --via grpc, --parity or --live-experiment)"
        )
    if any(v is not None for v in (args.guard_window, args.guard_margin, args.guard_z)):
        from device_ranker.guard import GuardConfig

        over["guard"] = GuardConfig(
            **{
                k: v
                for k, v in (
                    ("window", args.guard_window),
                    ("margin", args.guard_margin),
                    ("z", args.guard_z),
                )
                if v is not None
            }
        )
    if args.continual_every is not None:
        from codebook.continual import ContinualConfig

        over["continual"] = ContinualConfig(interval_s=args.continual_every)
    cfg = ReplayConfig(
        seed=args.seed,
        workers=args.workers,
        quick=args.quick,
        **{k: v for k, v in over.items() if v is not None},
    )
    policies = args.policies or (DEFAULT_POLICIES if args.parity and not args.budgets else None)
    if policies:
        if args.budgets or args.finetune_every:
            raise ValidationError(
                "--policies already names every policy (e.g. finetune:5 or system:gate:0.2); "
                "drop --budgets and --finetune-every"
            )
        specs = [PolicySpec.parse(t) for t in policies.split(",") if t.strip()]
    else:
        budgets = (
            [parse_budget(b) for b in args.budgets.split(",") if b.strip()]
            if args.budgets
            else list(QUICK_BUDGETS if args.quick else DEFAULT_BUDGETS)
        )
        specs = default_policies(budgets)
        if args.via == "grpc" or args.parity:  # the services run static and the system only
            specs = [s for s in specs if s.kind in ("static", "system")]
        if args.finetune_every:
            specs = [
                PolicySpec("finetune", finetune_every=args.finetune_every)
                if s.kind == "finetune"
                else s
                for s in specs
            ]
    return cfg, specs


def cmd_replay(args: argparse.Namespace) -> int:
    import torch

    from recsys import settings
    from recsys.data.registry import load_dataset
    from recsys.errors import ValidationError

    if not (args.out or args.parity or args.live_experiment):  # usage error, exit code 2
        args._replay_parser.error(
            "one of the arguments --out --parity --live-experiment is required "
            "(or the subcommand: recsys replay compare ...)"
        )
    if args.threads < 1:
        raise ValidationError(f"--threads must be >= 1, got {args.threads}")
    if args.event_log and not args.live_experiment:
        raise ValidationError("--event-log goes with --live-experiment FILE")
    torch.set_num_threads(args.threads)
    cfg, specs = build_config(args)
    cache = settings.cache_dir(args.cache_dir)
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    if args.parity:
        return _parity(args, ds, cfg, specs, cache)
    if args.live_experiment:
        return _live(args, ds, cfg, cache)
    return _report(args, ds, cfg, specs, cache)


def _grpc_options(args: argparse.Namespace):
    from recsys.replay.config import GrpcOptions

    return GrpcOptions(concurrency=args.concurrency)


def _report(args: argparse.Namespace, ds, cfg, specs, cache: Path) -> int:
    """The report mode: every policy, one driver, tables, OUT/results.* and plots."""
    from recsys.replay.engine import run_replay
    from recsys.replay.report import (
        bullets,
        comparison_rows,
        cost_rows,
        fleet_evidence_rows,
        gate_rows,
        global_time_lines,
        goal_lines,
        guard_rows,
        header_line,
        learned_rows,
        per_user_figures,
        quality_rows,
        service_rows,
        summarise,
        write_report,
    )

    run = run_replay(
        ds, cfg, specs, cache=cache, progress=not args.no_progress, via=args.via,
        grpc=_grpc_options(args) if args.via == "grpc" else None,
    )  # fmt: skip
    summary = summarise(run)
    print(header_line(summary))
    print_table(quality_rows(summary), title="Quality: full-catalogue ranking, seen items excluded")
    rows = comparison_rows(summary)
    if rows:
        print_table(rows, title="Paired NDCG@10 differences (user-bootstrap 95% CIs)")
    print_table(cost_rows(summary), title="Cost per policy (device compute = edit updates only)")
    for line in bullets(global_time_lines(summary)):
        print(line)
    rows = service_rows(summary)
    if rows:
        print_table(rows, title="Through the services (round trips seen by the driver)")
    rows = gate_rows(summary)
    if rows:
        print_table(rows, title="Request gate: threshold calibrated once on the training period")
    rows = learned_rows(summary)
    if rows:
        print_table(rows, title="Share of the 100% budget's NDCG@10 gain over static kept")
    rows = guard_rows(summary)
    if rows:
        print_table(rows, title="Harm guard: edits applied or kept out (device check time)")
    rows = fleet_evidence_rows(summary)
    if rows:
        title = (
            "Fleet guard: what the pooled evidence could tell (hindsight: whole-stream gain and sd)"
        )
        print_table(rows, title=title)
    print("\nTargets (as measured):")
    lines = bullets(goal_lines(summary))
    for line in lines:
        print(line)
    if not lines:
        print("- not applicable: the targets compare static, finetune and system gate 100%/10%")
    out = Path(args.out)
    paths = write_report(summary, out, per_user_figures(run))
    print(
        f"\nwrote {', '.join(p.name for p in paths.values())} to {out} "
        f"({run.meta['seconds']['total']:.0f} s)"
    )
    write_json(args.json, summary)
    return 0


def _parity(args: argparse.Namespace, ds, cfg, specs, cache: Path) -> int:
    """The parity mode: the same replay through both drivers, compared."""
    from recsys.replay.parity import (
        global_parity_rows,
        parity_cost_rows,
        parity_rows,
        run_parity,
    )

    res = run_parity(
        ds, cfg, specs, cache=cache, options=_grpc_options(args), progress=not args.no_progress
    )
    rows = parity_rows(res.local, res.remote)
    shown = [{k: f"{v:.1e}" if k.endswith("diff|") else v for k, v in r.items()} for r in rows]
    sec = res.seconds
    print_table(
        shown,
        title=f"Replay parity on {ds.name}: in process vs through the gRPC services, "
        f"{res.remote.meta['stream']['stream_users']} users, seed {cfg.seed} "
        f"(in process {sec['inprocess']:.0f} s, gRPC {sec['grpc']:.0f} s)",
    )
    cost_rows = parity_cost_rows(res.local, res.remote)
    print_table(
        cost_rows,
        title="Costs: in process (estimated uplink, payload bytes) vs gRPC (serialized "
        "messages, prototypes re-sent when the device reports another one)",
    )
    bank_rows = global_parity_rows(res)
    if bank_rows:
        print_table(
            bank_rows,
            title="The shared cloud (global time): in process (one request per slice) vs one "
            "cloud server refining into the store",
        )
    write_json(
        args.json,
        {
            "parity": rows,
            "costs": cost_rows,
            "config": cfg.to_dict(),
            "dataset": res.remote.meta["dataset"],
            "seed": cfg.seed,
            "stream": res.remote.meta["stream"],
            "costs_inprocess": res.local.costs,
            "costs_grpc": res.remote.costs,
            "gate": res.remote.meta["gate"],
            "global_time": {
                "bank": bank_rows,
                "inprocess": res.local.meta.get("global_time"),
                "grpc": res.remote.meta.get("global_time"),
            }
            if bank_rows
            else None,
            "servers": res.remote.meta["servers"],
            "seconds": sec,
        },
    )
    return 0


def _live(args: argparse.Namespace, ds, cfg, cache: Path) -> int:
    """The live A/B mode: one device server serving the experiment, its event log."""
    import time

    from recsys.errors import ValidationError
    from recsys.replay.live import run_live_experiment

    if not args.event_log:
        raise ValidationError("--live-experiment needs --event-log PATH")
    t0 = time.perf_counter()
    info = run_live_experiment(
        ds, cfg, Path(args.live_experiment), Path(args.event_log), cache=cache,
        progress=not args.no_progress, concurrency=args.concurrency,
    )  # fmt: skip
    info["seconds"] = time.perf_counter() - t0
    rows = [{k: v for k, v in info.items() if k != "servers"}]
    print_table(rows, title=f"Live A/B traffic on {ds.name} through one device server")
    print(
        f"analyse it: recsys abtest analyze --events {args.event_log} "
        f"--experiment {args.live_experiment} --out DIR"
    )
    write_json(args.json, {"live": info, "config": cfg.to_dict(), "dataset": ds.name})
    return 0
