"""The run summary leads with the federation's evaluation metric, and says plainly when the
coordinator has no held-out set (sites evaluate; their metrics are in MLflow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedround.flows.cli.main import NO_HOLDOUT, metric_lines, print_summary


def test_the_demo_line_is_unchanged() -> None:
    assert metric_lines({"loss": 0.16534, "accuracy": 0.952}, "accuracy") == [
        "  accuracy     0.9520 on the held-out set (loss 0.1653)"
    ]


def test_the_federations_metric_leads_then_loss_then_the_rest() -> None:
    [line] = metric_lines({"mae": 2.5, "r2": 0.81234, "loss": 9.0, "mse": 9.0}, "r2")
    assert line == "  r2           0.8123 on the held-out set (loss 9.0000, mae 2.5000, mse 9.0000)"


def test_no_holdout_says_so() -> None:
    assert metric_lines({}, "auc") == [f"  metrics      {NO_HOLDOUT}"]
    assert "set evaluation.holdout" in NO_HOLDOUT and "MLflow" in NO_HOLDOUT


def test_print_summary_without_holdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = {
        "run_id": "r1",
        "federation": "clinic",
        "rounds": 3,
        "resumed_from_round": 0,
        "final_metrics": {},
        "sites": {"participating": ["a", "b"], "excluded": {}},
        "model": None,
        "checkpoint": {"uri": "file:///x", "weights_sha256": "ab" * 32},
        "timings": {"flow_seconds": 1.0, "round_median_seconds": 0.2},
        "mlflow": {"tracking_uri": "sqlite:///m.db"},
    }
    print_summary(result, tmp_path / "result.json", tmp_path, "auc")
    out = capsys.readouterr().out
    assert "no central held-out set (set evaluation.holdout)" in out
    assert "nan" not in out
