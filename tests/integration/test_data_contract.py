"""Great Expectations, for real: a site whose data breaks its contract is named and why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedround.site_workers.contract import check_site_contract
from fedround.site_workers.data import save_site_data
from fedround.tasks.core.config import DataConfig, TableConfig
from fedround.tasks.core.contract_report import ContractReport, RuleResult

REPO = Path(__file__).resolve().parents[2]
SUITE = json.loads((REPO / "deployments/examples/contracts/mnist-site-data.json").read_text())


def _site_file(tmp_path: Path, features: np.ndarray, labels: np.ndarray) -> Path:
    path = tmp_path / "train.npz"
    save_site_data(path, features, labels)
    return path


@pytest.fixture
def good() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (50, 784)).astype(np.float32), rng.integers(0, 10, 50)


def test_clean_site_data_passes(tmp_path: Path, good) -> None:
    report = check_site_contract(_site_file(tmp_path, *good), SUITE, "site-a")
    assert report.success, report.summary()
    assert report.row_count == 50
    assert len(report.results) == len(SUITE["expectations"])


def test_label_out_of_set_names_the_column_and_the_rule(tmp_path: Path, good) -> None:
    features, labels = good
    labels = labels.copy()
    labels[[3, 7]] = 11
    report = check_site_contract(_site_file(tmp_path, features, labels), SUITE, "site-b")
    assert not report.success
    [failure] = report.failures
    assert (failure.column, failure.rule) == ("label", "expect_column_values_to_be_in_set")
    assert failure.unexpected_count == 2
    assert "11" not in failure.model_dump_json()  # the offending values never leave the site
    summary = report.summary()
    assert "site site-b fails data contract 'mnist-site-data'" in summary
    assert "column 'label' broke expect_column_values_to_be_in_set" in summary


def test_pixels_out_of_range_and_nan_are_reported(tmp_path: Path, good) -> None:
    features, labels = good
    features = features.copy()
    features[0, 5] = 300.0
    features[1, 9] = np.nan
    report = check_site_contract(_site_file(tmp_path, features, labels), SUITE, "site-c")
    broken = {(f.column, f.rule) for f in report.failures}
    assert ("feature_max", "expect_column_values_to_be_between") in broken
    assert ("n_missing", "expect_column_values_to_be_between") in broken


def test_missing_column_is_reported_by_name(tmp_path: Path, good) -> None:
    features, _ = good
    path = tmp_path / "train.npz"
    np.savez(path, features=features)  # the labels array is missing
    report = check_site_contract(path, SUITE, "site-d")
    assert not report.success
    label_rules = [f for f in report.failures if f.column == "label"]
    assert label_rules and all("column 'label' is missing" in (f.error or "") for f in label_rules)


def test_wrong_image_shape_breaks_the_feature_count_rule(tmp_path: Path, good) -> None:
    _, labels = good
    report = check_site_contract(
        _site_file(tmp_path, np.zeros((50, 783), np.float32), labels), SUITE, "site-e"
    )
    assert [f.column for f in report.failures] == ["n_features"]


def test_unreadable_data_is_a_failed_contract_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "train.npz"
    path.write_bytes(b"garbage")
    report = check_site_contract(path, SUITE, "site-f")
    assert not report.success
    assert report.failures[0].rule == "readable_data"


# --- tables: the real columns of a site's table -----------------------------------------

TABLE_SUITE = {
    "name": "clinic-table",
    "expectations": [
        {
            "type": "expect_table_columns_to_match_set",
            "kwargs": {"column_set": ["age", "bmi", "city", "y"], "exact_match": True},
        },
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 10}},
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "age", "min_value": 0, "max_value": 120},
        },
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "bmi", "mostly": 0.9}},
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "city", "value_set": ["berlin", "paris", "rome"]},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "y", "value_set": [0, 1]},
        },
    ],
}
TABLE = DataConfig(
    kind="table",
    source="sites",
    table=TableConfig(features=["age", "bmi", "city"], categorical=["city"], label="y"),
)


@pytest.fixture
def clinic() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 60
    return pd.DataFrame(
        {
            "age": rng.integers(18, 90, n),
            "bmi": rng.normal(25, 4, n).round(1),
            "city": rng.choice(["berlin", "paris", "rome"], n),
            "y": rng.integers(0, 2, n),
        }
    )


def _table(tmp_path: Path, frame: pd.DataFrame, name: str = "train.parquet") -> Path:
    path = tmp_path / name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


def _only_failure(report: ContractReport) -> RuleResult:
    assert not report.success
    [failure] = report.failures
    return failure


def test_clean_table_passes_and_carries_only_counts_and_sums(tmp_path: Path, clinic) -> None:
    report = check_site_contract(_table(tmp_path, clinic), TABLE_SUITE, "site-a", TABLE)
    assert report.success, report.summary()
    summary = report.data_summary
    assert summary is not None and summary.rows == 60
    assert sum(summary.categories["city"].values()) == 60
    assert summary.numeric["age"].count == 60
    assert summary.numeric["age"].sum == pytest.approx(float(clinic["age"].sum()))


def test_missing_table_column_is_named(tmp_path: Path, clinic) -> None:
    report = check_site_contract(
        _table(tmp_path, clinic.drop(columns=["bmi"]), "train.csv"), TABLE_SUITE, "site-b", TABLE
    )
    assert not report.success
    bmi = [f for f in report.failures if f.column == "bmi"]
    assert bmi and "column 'bmi' is missing" in (bmi[0].error or "")
    assert ("expect_table_columns_to_match_set", None) in {
        (f.rule, f.column) for f in report.failures
    }


@pytest.mark.security("secrets-in-logs")
def test_out_of_range_values_name_column_rule_and_count_but_never_the_values(
    tmp_path: Path, clinic
) -> None:
    clinic.loc[[2, 5, 11], "age"] = 987654
    report = check_site_contract(_table(tmp_path, clinic), TABLE_SUITE, "site-c", TABLE)
    failure = _only_failure(report)
    assert (failure.column, failure.rule) == ("age", "expect_column_values_to_be_between")
    assert failure.unexpected_count == 3
    assert "987654" not in report.model_dump_json()
    assert "column 'age' broke expect_column_values_to_be_between" in report.summary()
    assert "3 rows" in report.summary()


def test_null_fraction_above_the_allowed_share(tmp_path: Path, clinic) -> None:
    clinic["bmi"] = clinic["bmi"].astype(float)
    clinic.loc[:17, "bmi"] = np.nan  # 18 of 60 = 30 % missing, the suite allows 10 %
    report = check_site_contract(_table(tmp_path, clinic), TABLE_SUITE, "site-d", TABLE)
    failure = _only_failure(report)
    assert (failure.column, failure.rule) == ("bmi", "expect_column_values_to_not_be_null")
    assert failure.unexpected_count == 18
    assert failure.arguments["mostly"] == 0.9


def test_category_outside_the_set_is_counted_not_sent(tmp_path: Path, clinic) -> None:
    clinic.loc[[0, 1], "city"] = "atlantis-ward-7"
    report = check_site_contract(_table(tmp_path, clinic), TABLE_SUITE, "site-e", TABLE)
    failure = _only_failure(report)
    assert (failure.column, failure.rule) == ("city", "expect_column_values_to_be_in_set")
    assert failure.unexpected_count == 2
    assert "atlantis" not in report.model_dump_json()


def test_row_count_below_the_bound(tmp_path: Path, clinic) -> None:
    report = check_site_contract(_table(tmp_path, clinic.head(5)), TABLE_SUITE, "site-f", TABLE)
    failure = _only_failure(report)
    assert (failure.column, failure.rule) == (None, "expect_table_row_count_to_be_between")
    assert failure.observed == 5


def test_columns_the_federation_declares_but_the_table_lacks(tmp_path: Path, clinic) -> None:
    suite = {**TABLE_SUITE, "expectations": TABLE_SUITE["expectations"][1:]}  # no column set
    data = TABLE.model_copy(
        update={
            "table": TableConfig(
                features=["age", "bmi", "city", "weight"], categorical=["city"], label="y"
            )
        }
    )
    report = check_site_contract(_table(tmp_path, clinic), suite, "site-g", data)
    failure = _only_failure(report)
    assert failure.rule == "declared_columns"
    assert "['weight']" in (failure.error or "") and "data.table" in (failure.error or "")
    assert report.data_summary is None  # no set-up summary from a table that cannot train


def test_a_missing_file_is_named_without_its_path(tmp_path: Path) -> None:
    folder = tmp_path / "private" / "exports"
    report = check_site_contract(folder / "train.parquet", TABLE_SUITE, "site-h", TABLE)
    failure = _only_failure(report)
    assert failure.rule == "readable_data" and "train.parquet" in (failure.error or "")
    assert "does not exist" in (failure.error or "")
    assert "private" not in report.model_dump_json()  # the folder stays at the site
