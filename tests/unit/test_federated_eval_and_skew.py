"""Federated evaluation (the sites' figures for the previous round's model, weighted by
examples) and the label-skew report (χ² and total variation from counts only), against
hand computations."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fedround.site_workers.contract import count_labels
from fedround.tasks.core.config import FederatedEvaluationConfig
from fedround.tasks.core.config import parse_federation_config as parse
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.federated_eval import (
    eval_report,
    evaluating_sites,
    federated_metrics,
    per_site_metrics,
    sample_evaluators,
    site_eval,
    without_eval,
)
from fedround.tasks.core.preprocessing import SiteSummary
from fedround.tasks.core.skew import bounded_counts, label_counts, label_skew, label_skew_report

MINIMAL = "federation: fed\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"

# --- federated evaluation ---------------------------------------------------------------


def test_site_reports_its_figures_with_a_prefix_and_the_count() -> None:
    report = eval_report({"accuracy": 0.75, "loss": 0.5}, 40)
    assert report == {"eval_accuracy": 0.75, "eval_loss": 0.5, "eval_examples": 40.0}
    assert site_eval({**report, "train_loss": 1.0}) == ({"accuracy": 0.75, "loss": 0.5}, 40.0)
    assert without_eval({**report, "train_loss": 1.0}) == {"train_loss": 1.0}


def test_federated_figures_are_example_weighted_means() -> None:
    # a: 30 of 40 right (0.75), b: 50 of 60 right (0.8333…) → pooled 80 / 100 = 0.8
    reports = {
        "a": {**eval_report({"accuracy": 0.75, "loss": 1.0}, 40), "train_loss": 9.0},
        "b": eval_report({"accuracy": 50 / 60, "loss": 0.5}, 60),
    }
    federated = federated_metrics(reports)
    assert federated["federated_accuracy"] == pytest.approx(0.8)
    assert federated["federated_loss"] == pytest.approx((40 * 1.0 + 60 * 0.5) / 100)  # 0.7
    assert federated["federated_examples"] == 100
    assert federated["federated_sites"] == 2
    assert "federated_train_loss" not in federated


def test_a_site_cannot_outweigh_the_others_past_its_cap() -> None:
    # b claims a million examples; capped at the 60 rows its contract checked
    reports = {
        "a": eval_report({"accuracy": 1.0}, 40),
        "b": eval_report({"accuracy": 0.0}, 1_000_000),
    }
    federated = federated_metrics(reports, caps={"a": 100, "b": 60})
    assert federated["federated_accuracy"] == pytest.approx(40 / 100)
    assert federated["federated_examples"] == 100


@pytest.mark.security("untrusted-site-objects")
def test_sites_without_figures_and_non_finite_values_are_left_out() -> None:
    reports = {
        "a": eval_report({"accuracy": 0.5, "loss": math.nan}, 10),
        "b": {"train_loss": 0.3},  # trained, did not evaluate
        "c": eval_report({"accuracy": 1.0}, 0),  # evaluated nothing
        "d": {"eval_accuracy": 0.9},  # no count: cannot be weighed
    }
    federated = federated_metrics(reports)
    assert federated == {
        "federated_accuracy": 0.5,
        "federated_examples": 10.0,
        "federated_sites": 1.0,
    }
    assert federated_metrics({"b": {"train_loss": 0.3}}) == {}


def test_per_site_figures_are_logged_under_the_site() -> None:
    logged = per_site_metrics({"a": eval_report({"accuracy": 0.5}, 10), "b": {"x": 1.0}})
    assert logged == {"site.a.eval_accuracy": 0.5, "site.a.eval_examples": 10.0}


def test_which_models_are_evaluated_and_by_whom() -> None:
    every_other = FederatedEvaluationConfig(every=2, fraction=0.5)
    sites = [f"s{i}" for i in range(5)]
    assert evaluating_sites(sites, every_other, seed=1, round_=2) == []  # round 1's model
    chosen = evaluating_sites(sites, every_other, seed=1, round_=3)  # round 2's model
    assert len(chosen) == 3 and set(chosen) <= set(sites)  # ceil(0.5 · 5)
    assert chosen == evaluating_sites(reversed(sites), every_other, seed=1, round_=3)
    assert evaluating_sites(sites, FederatedEvaluationConfig(), 1, 1) == sites  # round 0's
    assert evaluating_sites(sites, FederatedEvaluationConfig(every=0), 1, 1) == []
    assert sample_evaluators(sites, 0.01, 1, 4) != []  # at least one
    samples = {tuple(sample_evaluators(sites, 0.4, 1, r)) for r in range(1, 30)}
    assert len(samples) > 1  # resampled by round


def test_federated_evaluation_config_is_checked() -> None:
    config = parse(MINIMAL)
    assert config.evaluation.federated == FederatedEvaluationConfig(every=1, fraction=1, final=True)
    custom = parse(MINIMAL + "evaluation: {federated: {every: 5, fraction: 0.2}}\n")
    assert (custom.evaluation.federated.every, custom.evaluation.federated.fraction) == (5, 0.2)
    with pytest.raises(ConfigError, match=r"evaluation\.federated\.fraction"):
        parse(MINIMAL + "evaluation: {federated: {fraction: 0}}\n")
    with pytest.raises(ConfigError, match=r"evaluation\.federated\.every"):
        parse(MINIMAL + "evaluation: {federated: {every: -1}}\n")
    with pytest.raises(ConfigError, match=r"evaluation\.federated\.sample"):
        parse(MINIMAL + "evaluation: {federated: {sample: 3}}\n")


# --- label skew ---------------------------------------------------------------------------


def test_two_mirrored_sites_by_hand() -> None:
    # federation 40/40 → p = (½, ½); a: n = 40, expected 20/20, observed 30/10
    # χ² = (30−20)²/20 + (10−20)²/20 = 10; TV = ½(|¾−½| + |¼−½|) = ¼
    skew = label_skew({"a": {"0": 30, "1": 10}, "b": {"0": 10, "1": 30}})
    for site in ("a", "b"):
        assert skew[site].chi2 == pytest.approx(10.0)
        assert skew[site].tv_distance == pytest.approx(0.25)
        assert skew[site].dof == 1
        assert skew[site].missing_classes == []


def test_three_classes_with_a_missing_one_by_hand() -> None:
    # federation: x 20, y 20, z 20 → p = ⅓ each
    # a (n 20, expected 20/3 each): 2·(10 − 20/3)²/(20/3) + (0 − 20/3)²/(20/3) = 10/3 + 20/3
    # b (n 40, expected 40/3 each): 2·(10 − 40/3)²/(40/3) + (20 − 40/3)²/(40/3) = 5/3 + 10/3
    skew = label_skew({"a": {"x": 10, "z": 10}, "b": {"x": 10, "y": 20, "z": 10}})
    assert skew["a"].chi2 == pytest.approx(10.0)
    assert skew["b"].chi2 == pytest.approx(5.0)
    assert skew["a"].tv_distance == pytest.approx(1 / 3)  # ½(⅙ + ⅓ + ⅙)
    assert skew["b"].tv_distance == pytest.approx(1 / 6)  # ½(1/12 + ⅙ + 1/12)
    assert (skew["a"].classes, skew["a"].dof, skew["a"].missing_classes) == (2, 2, ["y"])
    assert skew["b"].missing_classes == []


def test_a_site_like_the_federation_has_no_skew() -> None:
    skew = label_skew({"a": {"0": 5, "1": 15}, "b": {"0": 10, "1": 30}})
    assert skew["a"].chi2 == pytest.approx(0.0)
    assert skew["b"].tv_distance == pytest.approx(0.0)


@pytest.mark.security("self-reported-weight")
def test_counts_are_bounded_by_the_rows_checked() -> None:
    assert bounded_counts({"0": 300, "1": 100, "2": -5, "3": math.inf}, 40) == {
        "0": 30.0,
        "1": 10.0,
    }
    assert bounded_counts({"0": 3}, 40) == {"0": 3.0}


def test_the_report_reads_tables_and_arrays_alike() -> None:
    table = ContractReport(
        site="a",
        suite="s",
        success=True,
        row_count=40,
        results=[],
        data_summary=SiteSummary(rows=40, labels={"0": 30, "1": 10}),
    )
    arrays = ContractReport(
        site="b", suite="s", success=True, row_count=40, results=[], label_counts={"0": 10, "1": 30}
    )
    regression = ContractReport(site="c", suite="s", success=True, row_count=9, results=[])
    assert label_counts(table) == {"0": 30.0, "1": 10.0}
    assert label_counts(regression) is None
    report = label_skew_report({"a": table, "b": arrays, "c": regression})
    assert sorted(report["sites"]) == ["a", "b"]
    assert report["sites"]["a"]["chi2"] == pytest.approx(10.0)
    assert report["federation"] == {"0": 40.0, "1": 40.0}
    assert report["max_tv_distance"] == pytest.approx(0.25)
    assert label_skew_report({"c": regression}) == {}


def test_an_arrays_site_counts_its_labels_without_row_values() -> None:
    frame = pd.DataFrame({"label": [3, 3, 1, 3, None], "n_features": [784] * 5})
    assert count_labels(frame) == {"3": 3, "1": 1}
    assert count_labels(frame.drop(columns="label")) is None
