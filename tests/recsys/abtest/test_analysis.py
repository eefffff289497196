"""Per-user tables, the full analysis, the report files and the plots on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from abtest_synthetic import T0, events, experiment

from recsys.abtest.analysis import analyze
from recsys.abtest.plots import make_plots
from recsys.abtest.report import write_report
from recsys.abtest.usertable import read_tables, summarise, write_tables
from recsys.errors import DataFormatError, ValidationError


def tables(exp, **kw):
    ids, arms, ev, pre = events(exp, **kw)
    return summarise(ids, arms, ev, metrics=exp.metrics, start=T0, pre_events=pre)


def test_tables_round_trip_through_csv(tmp_path: Path) -> None:
    exp = experiment()
    users, daily = tables(exp, users=80, per_user=5)
    write_tables(tmp_path, users, daily)
    u2, d2 = read_tables(tmp_path)
    np.testing.assert_array_equal(u2.user_id, users.user_id)
    np.testing.assert_array_equal(u2.arm, users.arm)
    for m in exp.metrics:
        np.testing.assert_allclose(u2.values[m], users.values[m])
        np.testing.assert_allclose(u2.pre[m], users.pre[m])
    np.testing.assert_allclose(d2.counts, daily.counts)
    np.testing.assert_allclose(d2.sums["ndcg@10"], daily.sums["ndcg@10"])
    # the last day's cumulative sums give back the per-user means
    last = daily.sums["ndcg@10"][-1] / daily.counts[-1]
    np.testing.assert_allclose(last, users.values["ndcg@10"])


def test_bad_tables_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"users\.csv: missing"):
        read_tables(tmp_path)
    (tmp_path / "users.csv").write_text("user_id,arm,n_events,ndcg@10,pre_n_events\nu1,a,x,0.1,0\n")
    with pytest.raises(DataFormatError, match="line 2: column n_events: 'x' is not a number"):
        read_tables(tmp_path)


def test_analysis_detects_the_planted_effect_and_writes_every_key(tmp_path: Path) -> None:
    exp = experiment()
    users, daily = tables(exp)
    report = analyze(exp, users, daily)
    good = report["comparisons"]["ndcg@10"]["good"]
    same = report["comparisons"]["ndcg@10"]["same"]
    assert good["verdict"] == "ship" and good["welch"]["diff"] > 0
    assert good["sequential"]["reject"] and good["sequential"]["looks"] > 3
    assert same["verdict"] == "no detectable effect"
    assert report["verdicts"]["good"] == "ship"
    # (the "same" arm's guardrails are each a 5 % coin under the null: not asserted)
    assert not report["srm"]["flag"]
    # CUPED: the pre-period shares the user's skill -> variance drops, covariate for all
    cuped = report["cuped"]["ndcg@10"]
    assert cuped["used"] and cuped["variance_reduction"] > 0.1
    assert cuped["n_with_covariate"] == report["users"]
    assert good["cuped"]["se"] < good["welch"]["se"]
    # Holm: adjusted p-values are never below the raw ones
    for arm in ("good", "same"):
        r = report["comparisons"]["ndcg@10"][arm]
        assert r["p_holm"] >= r["cuped"]["p_value"] - 1e-15
    # the guardrail improved too; the secondary metric has no verdict of its own
    assert report["comparisons"]["hr@10"]["good"]["verdict"] == "improved"
    assert report["comparisons"]["request_rate"]["good"]["verdict"] in (
        "higher",
        "lower",
        "no detectable effect",
    )
    plots = make_plots(report, tmp_path)
    js, md = write_report(tmp_path, report, plots)
    assert plots == ["effects.png", "sequential.png"]
    for p in plots:
        assert (tmp_path / p).stat().st_size > 10_000
    data = json.loads(js.read_text())  # strict JSON: no NaN
    for key in (
        "experiment",
        "users",
        "arms",
        "srm",
        "cuped",
        "comparisons",
        "verdicts",
        "days",
        "plots",
    ):
        assert key in data
    for key in ("welch", "bootstrap", "cuped", "power", "sequential", "p_holm", "verdict"):
        assert key in data["comparisons"]["ndcg@10"]["good"]
    for key in ("mde", "mde_rel", "power_at_ref_lift"):
        assert data["comparisons"]["ndcg@10"]["good"]["power"][key] is not None
    text = md.read_text()
    for section in (
        "## Verdict",
        "## Sample-ratio check",
        "## CUPED",
        "## Sequential test",
        "## Power",
        "effects.png",
    ):
        assert section in text


def test_broken_split_triggers_the_srm_verdict() -> None:
    exp = experiment(weights=(0.5, 0.5))
    users, daily = tables(exp, users=4000, per_user=2, arm_weights=(0.55, 0.45))
    report = analyze(exp, users, daily)
    assert report["srm"]["flag"] and report["srm"]["p_value"] < 1e-3
    assert report["verdicts"] == {"good": "SRM - don't trust"}
    assert report["comparisons"]["ndcg@10"]["good"]["verdict"] == "SRM - don't trust"


def test_analysis_rejects_data_of_another_experiment() -> None:
    exp = experiment()
    users, daily = tables(exp, users=60, per_user=3)
    users.arm[0] = "stranger"
    with pytest.raises(ValidationError, match="does not define"):
        analyze(exp, users, daily)
    other = experiment(secondary_metrics=["request_rate", "auc"])
    users, daily = tables(experiment(), users=60, per_user=3)
    with pytest.raises(ValidationError, match=r"no column for metric\(s\) \['auc'\]"):
        analyze(other, users, daily)


def test_a_metric_constant_in_both_arms_is_no_evidence() -> None:
    exp = experiment(weights=(0.5, 0.5))
    users, daily = tables(exp, users=200, per_user=3)
    users.values["request_rate"][:] = 0.0  # e.g. an A/A test of two static arms
    report = analyze(exp, users, daily)
    r = report["comparisons"]["request_rate"]["good"]
    assert r["p_holm"] == 1.0 and r["verdict"] == "no detectable effect"
    assert r["welch"]["diff"] == 0.0 and r["power"]["mde"] is None
