"""The per-round site table and the run summary the Prefect UI shows."""

from __future__ import annotations

import math

from fedround.flows.round_artifacts import artifact_key, chart_points
from fedround.tasks.core.round_table import (
    MAX_REASON,
    MAX_SITE_METRICS,
    RunOverview,
    SiteFigures,
    site_rows,
    status_counts,
    summary_markdown,
    table,
)


def _rows() -> list:
    return site_rows(
        selected=["a", "b", "c", "d"],
        accepted={"a": 100, "b": 50},
        rejected={"c": "norm 1e9 above the limit 1e3"},
        failed={"d": "failed: train() raised ValueError"},
        late={"e (round 2)": "late update rejected: round closed"},
        left_out={"f": "3 strikes"},
        excluded={"g": "column 'label' broke expect_column_values_to_be_in_set: 5 rows"},
        figures={
            "a": SiteFigures(100, 0.5, 4000, 4100, {"train_loss": 0.25, "nan": math.nan}),
            "b": SiteFigures(50, 0.25, 4000, 4100, {"train_loss": 0.5}),
            "c": SiteFigures(70, 0.4, 4000, 4100, {}),
        },
    )


def test_every_touched_site_has_one_row_with_its_status_and_reason() -> None:
    rows = _rows()
    assert [(r.site, r.status) for r in rows] == [
        ("a", "trained"),
        ("b", "trained"),
        ("c", "rejected"),
        ("d", "failed"),
        ("f", "left out"),
        ("g", "excluded"),
        ("e (round 2)", "late"),
    ]
    by_site = {r.site: r for r in rows}
    assert by_site["a"].examples == 100 and by_site["a"].bytes_up == 4000
    assert by_site["a"].metrics == {"train_loss": 0.25}  # a NaN the site reported is dropped
    assert by_site["c"].reason == "norm 1e9 above the limit 1e3"
    assert by_site["d"].examples == 0 and by_site["d"].seconds == 0.0
    assert status_counts(rows) == {
        "trained": 2,
        "rejected": 1,
        "failed": 1,
        "late": 1,
        "left out": 1,
        "excluded": 1,
    }


def test_site_reported_values_are_bounded() -> None:
    many = {f"m{i:02d}": float(i) for i in range(20)}
    [row] = site_rows(
        selected=["x"],
        accepted={},
        rejected={},
        failed={"x": "y" * 10_000},
        late={},
        left_out={},
        excluded={},
        figures={"x": SiteFigures(-5, math.inf, -1, -1, many)},
    )
    assert len(row.reason) == MAX_REASON
    assert len(row.metrics) == MAX_SITE_METRICS
    assert (row.seconds, row.bytes_up, row.bytes_down) == (0.0, 0, 0)


def test_table_has_one_column_per_site_metric() -> None:
    flat = table(_rows())
    assert flat[0]["train_loss"] == 0.25 and flat[2]["train_loss"] == ""
    assert set(flat[0]) == {
        "site",
        "status",
        "reason",
        "examples",
        "seconds",
        "bytes up",
        "bytes down",
        "train_loss",
    }


def test_summary_names_the_run_the_metric_and_escapes_table_cells() -> None:
    markdown = summary_markdown(
        RunOverview(
            federation="churn",
            tenant="acme",
            run_id="r1",
            config_revision="abc123",
            strategy="fedavg",
            mode="sync",
            rounds=2,
            metric="accuracy",
            final_metrics={"loss": 0.5, "accuracy": 0.9},
            participating=["a", "b"],
            excluded={"c|d": "broke a rule"},
            history=[(1, 0.8), (2, 0.9)],
            bytes_up=2048,
            bytes_down=1024 * 1024 * 3,
            model="churn-global version 4",
            mlflow_url="http://127.0.0.1:5000/#/models/churn-global/versions/4",
        )
    )
    assert "| sites | 2 took part, 1 excluded |" in markdown
    assert "| traffic | 2.0 KiB up, 3.0 MiB down |" in markdown
    assert "[churn-global version 4](http://127.0.0.1:5000/#/models/churn-global/versions/4)" in (
        markdown
    )
    assert markdown.index("| accuracy | 0.9000 |") < markdown.index("| loss | 0.5000 |")
    assert "| c\\|d | broke a rule |" in markdown
    assert "| 2 | 0.9000 |" in markdown


def test_chart_points_take_the_global_metric_and_trained_sites_local_metric() -> None:
    history = [
        {
            "round": 1,
            "metrics": {"accuracy": 0.5},
            "sites": [
                {"site": "a", "status": "trained", "metrics": {"train_accuracy": 0.4}},
                {"site": "b", "status": "failed", "metrics": {"train_accuracy": 0.9}},
            ],
        },
        {"round": 2, "metrics": {"accuracy": 0.7}},
    ]
    global_points, site_points, site_metric = chart_points("accuracy", history)
    assert global_points == [(1, 0.5), (2, 0.7)]
    assert site_points == {"a": [(1, 0.4)]}
    assert site_metric == "train_accuracy"


def test_artifact_keys_are_what_prefect_accepts() -> None:
    assert artifact_key("Churn_EU.2", "run-summary") == "churn-eu-2-run-summary"


def test_an_update_from_a_site_selected_earlier_still_has_its_row() -> None:
    rows = site_rows(
        selected=["b"],
        accepted={"a": 10, "b": 20},
        rejected={"c": "stale"},
        failed={},
        late={},
        left_out={},
        excluded={},
        figures={},
    )
    assert [(r.site, r.status, r.examples) for r in rows] == [
        ("b", "trained", 20),
        ("a", "trained", 10),
        ("c", "rejected", 0),
    ]
