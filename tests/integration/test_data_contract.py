"""Great Expectations, for real: a site whose data breaks its contract is named and why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedround.site_workers.contract import check_site_contract
from fedround.site_workers.data import save_site_data

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
