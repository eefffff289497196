"""``recsys abtest run | analyze | validate``: the A/B test harness.

recsys abtest run EXPERIMENT.toml --out DIR [--dataset ml-100k] [--quick] [--store-url URL]
recsys abtest analyze DIR [--experiment FILE] [--json PATH]
recsys abtest analyze --events LOG --experiment FILE --out DIR [--json PATH]
recsys abtest validate [--dataset ml-100k] --out DIR [--simulations N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from recsys.cli.common import (
    add_command,
    add_dataset_option,
    add_json_option,
    add_location_options,
    add_progress_option,
    add_seed_option,
    add_threads_option,
)
from recsys.reporting import dataset_record, print_table, strict_json, write_json

logger = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.json"
RUN_FILE = "run.json"


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``run``, ``analyze`` and ``validate`` to the ``abtest`` group."""
    p = add_command(
        groups["abtest"],
        "run",
        cmd_run,
        help="run an experiment over the replay stream: assign, persist, replay every arm",
        description="Assign every replay user to an arm by the hash of (salt, user), persist "
        "the assignments in the prototype store, replay each arm's policy over the time "
        "split's replay period and keep each user's events from their own arm. Each user's "
        "first [replay] pre_period_events evaluated events are their pre-period: their "
        "static-model metrics there are the CUPED covariates; only later events count. "
        "Writes DIR/users.csv (per-user metrics + covariate), DIR/daily.csv (per-day sums for "
        "the sequential test), DIR/experiment.json, DIR/run.json and DIR/assignments.sqlite.",
    )
    p.add_argument("experiment", help="experiment file (TOML, see examples/experiments/)")
    p.add_argument("--out", required=True, help="output directory")
    add_dataset_option(p)
    p.add_argument(
        "--quick", action="store_true", help="CI mode: a sample of users (replay --quick)"
    )
    p.add_argument(
        "--store-url",
        help="prototype store URL for the assignments (default: DIR/assignments.sqlite)",
    )
    add_seed_option(p, help="replay seed (sampled negatives; default 0)")
    p.add_argument(
        "--artifact", help="adaptor artefact (default CACHE_DIR/artifacts/NAME/adaptor/adaptor.pt)"
    )
    _add_run_options(p)

    p = add_command(
        groups["abtest"],
        "analyze",
        cmd_analyze,
        help="analyse an experiment: differences with CIs, CUPED, SRM, sequential test, power",
        description="Read the per-user metrics written by `recsys abtest run` (DIR) or convert "
        "a live event log of `recsys serve device --experiment FILE --event-log LOG` (--events), "
        "then compare every arm with the control: Welch and bootstrap CIs, CUPED, sample-ratio "
        "check, mSPRT over the days, power / MDE, Holm correction across arms and a verdict "
        "per metric. Writes report.md, report.json, effects.png and sequential.png.",
    )
    p.add_argument("directory", nargs="?", help="directory written by `recsys abtest run`")
    p.add_argument(
        "--experiment", help="experiment file (default: DIR/experiment.json written by run)"
    )
    p.add_argument("--events", metavar="LOG", help="live event log (JSON lines) to analyse")
    p.add_argument(
        "--min-history",
        type=int,
        default=5,
        help="with --events: skip events whose user had fewer earlier events (default 5, "
        "as the replay evaluation)",
    )
    p.add_argument("--out", help="where the report goes (default: DIR; required with --events)")
    add_json_option(p)

    p = add_command(
        groups["abtest"],
        "validate",
        cmd_validate,
        help="validation studies: A/A false-positive rates, planted-effect power, SRM, CUPED",
        description="(1) A/A: many salts re-randomise the ml-100k replay users (static model) "
        "into two arms: fixed-horizon false-positive rate with its Clopper-Pearson interval, "
        "and the mSPRT's false-positive rate with a look every day. (2) Planted effect: "
        "synthetic per-user metrics with a known lift; detection rate vs the power calculator. "
        "(3) SRM: a 55/45 split analysed as 50/50, and a correct split. (4) CUPED variance "
        "reduction on the replay metrics.",
    )
    add_dataset_option(p)
    p.add_argument("--out", required=True, help="directory for the results and the replay cache")
    p.add_argument("--simulations", type=int, default=1000, help="salts / simulations per study")
    p.add_argument("--quick", action="store_true", help="CI mode: a sample of replay users")
    add_seed_option(p, help="seed of the simulations (default 0)")
    p.add_argument(
        "--pre-period-events", type=int, default=10, help="events per user in the pre-period (10)"
    )
    _add_run_options(p)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """What ``run`` and ``validate`` (both replay the stream) share."""
    add_threads_option(p, default=1)
    add_progress_option(p)
    add_location_options(p)
    add_json_option(p)


# ---- analyze ------------------------------------------------------------------------------
def _load_experiment(path: str | None, directory: Path | None):
    from recsys.abtest.experiment import experiment_from_dict, load_experiment
    from recsys.errors import DataFormatError, ValidationError

    if path:
        return load_experiment(path)
    if directory is None:
        raise ValidationError("give --experiment FILE")
    saved = directory / EXPERIMENT_FILE
    if not saved.is_file():
        raise ValidationError(
            f"{saved} not found; pass --experiment FILE or a directory written by "
            "`recsys abtest run`"
        )
    try:
        data = json.loads(saved.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(saved, exc.lineno, f"invalid JSON ({exc.msg})") from None
    return experiment_from_dict(data, source=str(saved))


def cmd_analyze(args: argparse.Namespace) -> int:
    from recsys.abtest.analysis import analyze
    from recsys.abtest.eventlog import read_event_log
    from recsys.abtest.plots import make_plots
    from recsys.abtest.report import arm_rows, summary_rows, write_report
    from recsys.abtest.usertable import read_tables, write_tables
    from recsys.errors import DataFormatError, NotFoundError, ValidationError

    directory = Path(args.directory) if args.directory else None
    if args.events:
        if not args.experiment or not (args.out or directory):
            raise ValidationError("--events needs --experiment FILE and --out DIR")
        exp = _load_experiment(args.experiment, None)
        out = Path(args.out or directory)
        users, daily, run_info = read_event_log(args.events, exp, args.min_history)
        write_tables(out, users, daily)
        (out / EXPERIMENT_FILE).write_text(json.dumps(exp.to_dict(), indent=2) + "\n")
        (out / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")
        print(
            f"{run_info['events']:,} events of {run_info['users']:,} users from {args.events} "
            f"({run_info['assignment_mismatches']} user(s) in another arm than the hash says)"
        )
    else:
        if directory is None:
            raise ValidationError("give the directory written by `recsys abtest run`, or --events")
        if not directory.is_dir():
            raise NotFoundError(f"directory {directory} not found")
        out = Path(args.out) if args.out else directory
        exp = _load_experiment(args.experiment, directory)
        users, daily = read_tables(directory)
        run_file = directory / RUN_FILE
        try:
            run_info = json.loads(run_file.read_text()) if run_file.is_file() else {}
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                run_file, exc.lineno, f"not valid JSON ({exc.msg}); rerun `recsys abtest run`"
            ) from None
    report = analyze(exp, users, daily)
    report["run"] = run_info
    plots = make_plots(report, out)
    js, md = write_report(out, report, plots)
    print_table(arm_rows(report), title=f"Experiment {exp.name}: arms (per-user means)")
    srm = report["srm"]
    print(
        f"\nsample-ratio check: chi2 = {srm['chi2']:.3f}, p = {srm['p_value']:.4g} -> "
        f"{'MISMATCH: do not trust the results' if srm['flag'] else 'ok'}"
    )
    print_table(summary_rows(report), title="Differences vs control")
    print_table(
        [
            {
                "metric": m,
                "users with covariate": c["n_with_covariate"],
                "variance reduction": c["variance_reduction"],
                "used": "yes" if c["used"] else "no",
            }
            for m, c in report["cuped"].items()
        ],
        title="CUPED (pre-period covariate)",
    )
    print_table([{"arm": a, "verdict": v} for a, v in report["verdicts"].items()], title="Verdict")
    print(f"wrote {md}, {md.with_suffix('.html')}, {js} and {', '.join(plots)}")
    write_json(args.json, report)
    return 0


# ---- run ----------------------------------------------------------------------------------
def _setup(args: argparse.Namespace):
    import torch

    from recsys import settings
    from recsys.data.registry import load_dataset

    torch.set_num_threads(max(1, args.threads))
    cache = settings.cache_dir(args.cache_dir)
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    return ds, cache


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from recsys.abtest.experiment import load_experiment
    from recsys.abtest.runner import run_experiment

    exp = load_experiment(args.experiment)
    ds, cache = _setup(args)
    out = Path(args.out)
    print(f"experiment {exp.name}: {len(exp.arms)} arms on the {ds.name} replay stream")
    res = run_experiment(
        exp,
        ds,
        cache=cache,
        out=out,
        store_url=args.store_url,
        quick=args.quick,
        seed=args.seed,
        progress=not args.no_progress,
        artifact=args.artifact,
    )
    info, users = res.info, res.users
    rows = []
    for arm in exp.arms:
        m = users.arm == arm.name
        cost = info["costs"][arm.name]
        rows.append(
            {
                "arm": arm.name,
                "policy": info["arm_policies"][arm.name],
                "weight": arm.weight,
                "assigned": info["stored_arm_counts"].get(arm.name, 0),
                "exposed": int(m.sum()),
                "with covariate": int((users.pre_n_events[m] > 0).sum()),
                "events": int(users.n_events[m].sum()),
                exp.primary_metric: float(np.mean(users.values[exp.primary_metric][m]))
                if m.any()
                else float("nan"),
                "up bytes/req": float(cost["uplink_bytes_per_request"]),
                "down bytes/req": float(cost["downlink_bytes_per_request"]),
            }
        )
    print_table(rows, title="Arms (per-user means over the experiment period)")
    print(
        f"{info['assigned_users']} replay users assigned and persisted; {info['exposed_users']} "
        f"exposed (more than {exp.replay.pre_period_events} evaluated events); "
        f"{info['users_with_covariate']} with a pre-period covariate; "
        f"{info['experiment_events']:,} experiment events over {len(res.daily.days)} day(s)"
    )
    print(
        f"wrote {out}/users.csv, daily.csv, experiment.json, run.json; next: "
        f"recsys abtest analyze {out}"
    )
    write_json(
        args.json,
        {
            "experiment": exp.to_dict(),
            "arms": rows,
            "dataset": dataset_record(ds),
            "seed": args.seed,
            "quick": args.quick,
            "run": {k: v for k, v in info.items() if k != "replay"},
            "replay_config": info["replay"]["config"],
        },
    )
    return 0


# ---- validate -----------------------------------------------------------------------------
PLANTED_USERS = 1000  # synthetic users per arm of the planted-effect study
PLANTED_LIFTS = (0.05, 0.10, 0.15, 0.20)  # relative lifts of NDCG@10
SRM_SIZES = (300, 1000, 5000)  # users per simulated experiment of the SRM study


def _rate(r: dict) -> str:
    return f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def cmd_validate(args: argparse.Namespace) -> int:
    from recsys.abtest import studies
    from recsys.abtest.plots import plot_aa_pvalues

    sims = studies.check_simulations(args.simulations)
    ds, cache = _setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alpha = 0.05
    print(f"replaying the static model over the {ds.name} replay period ...")
    base = studies.replay_base(
        ds,
        cache=cache,
        pre_events=args.pre_period_events,
        quick=args.quick,
        seed=args.seed,
        progress=not args.no_progress,
    )
    aa = studies.aa_study(base, simulations=sims, alpha=alpha, seed=args.seed)
    print_table(
        [
            {
                "test": name,
                "rejections": aa[key]["count"],
                "salts": sims,
                "false-positive rate [95% CI]": _rate(aa[key]),
            }
            for name, key in (
                ("Welch, fixed horizon", "fixed_horizon"),
                ("Welch + CUPED, fixed horizon", "fixed_horizon_cuped"),
                ("mSPRT, a look every day", "sequential"),
                ("Welch p < 0.05 on any day (naive peeking)", "naive_daily_peeking"),
            )
        ],
        title=f"(1) A/A on the {ds.name} replay: {aa['users']} users, static model in both "
        f"arms, {sims} salts, {aa['metric']}, alpha = {alpha}, {aa['days']} days "
        f"({aa['looks_per_salt_mean']:.1f} looks on average)",
    )
    plot_aa_pvalues(aa["p_values"], out / "aa_pvalues.png")
    planted = studies.planted_study(
        base.users.values["ndcg@10"],
        users_per_arm=PLANTED_USERS,
        lifts_rel=PLANTED_LIFTS,
        simulations=sims,
        alpha=alpha,
        seed=args.seed,
    )
    print_table(
        [
            {
                "lift": f"+{100 * r['lift_rel']:g}%",
                "abs": r["lift_abs"],
                "users/arm": r["users_per_arm"],
                "predicted power": r["predicted_power"],
                "detected [95% CI]": _rate(r["measured"]),
                "z": r["z"],
                "within CI": "yes" if r["agrees"] else "no",
            }
            for r in planted
        ],
        title=f"(2) Planted effect: synthetic per-user NDCG@10 drawn from the replay's "
        f"per-user values, {sims} simulations per lift, Welch at alpha = {alpha}",
    )
    srm = studies.srm_study(sizes=SRM_SIZES, simulations=sims, seed=args.seed)
    print_table(
        [
            {
                "users": r["users"],
                "split": r["split"],
                "SRM alarms (p < 0.001) [95% CI]": _rate(r["alarm"]),
            }
            for r in srm
        ],
        title=f"(3) Sample-ratio check: hash assignment with {sims} salts per row",
    )
    cuped = studies.cuped_study(base)
    print_table(
        [
            {
                "metric": r["metric"],
                "users": r["users"],
                "with covariate": r["with_covariate"],
                "corr": r["corr"],
                "variance reduction": r["variance_reduction"],
                "= extra users": f"+{100 * r['equivalent_extra_users']:.1f}%",
            }
            for r in cuped
        ],
        title=f"(4) CUPED on the {ds.name} replay (covariate: the user's first "
        f"{args.pre_period_events} events under the static model); A/A standard error "
        f"with / without CUPED: {aa['se_ratio_cuped']:.3f}",
    )
    payload = {
        "dataset": dataset_record(ds),
        "config": {
            "simulations": sims,
            "alpha": alpha,
            "seed": args.seed,
            "quick": args.quick,
            "pre_period_events": args.pre_period_events,
            "tau_scale": studies.TAU_SCALE,
            "sequential_min_users": studies.SEQ_MIN_USERS,
            "planted_users_per_arm": PLANTED_USERS,
            "srm_sizes": list(SRM_SIZES),
        },
        "replay": base.info,
        "aa": {k: v for k, v in aa.items() if k != "p_values"},
        "planted": planted,
        "srm": srm,
        "cuped": cuped,
    }
    payload = strict_json(payload)
    (out / "validation.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'validation.json'} and {out / 'aa_pvalues.png'}")
    write_json(args.json, payload)
    return 0
