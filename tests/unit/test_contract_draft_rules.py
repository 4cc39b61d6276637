"""The drafting rules of ``fedround contract draft``, without running Great Expectations:
ranges widen by 10 % of the range and round outwards, null rules follow the sample's share,
small string columns and the label get value sets, and the draft says it is one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedround.site_workers.contract_draft import (
    MAX_AUTO_CATEGORIES,
    DraftError,
    draft_suite,
    widened_range,
)


@pytest.mark.parametrize(
    ("low", "high", "integer", "expected"),
    [
        (18, 89, True, (10, 97)),  # margin 7.1 → step 1: 10.9 ↓ 10, 96.1 ↑ 97
        (0.1, 0.9, False, (0.02, 0.98)),  # margin 0.08 → step 0.01
        (5, 5, True, (4, 6)),  # constant: 10 % of the value, whole numbers
        (-3.0, 3.0, False, (-3.6, 3.6)),
        (0, 1000, True, (0, 1100)),  # non-negative stays non-negative
        (12_000.0, 98_000.0, False, (3_000.0, 107_000.0)),  # margin 8,600 → step 1,000
    ],
)
def test_ranges_widen_by_a_tenth_of_the_range_and_round_outwards(
    low: float, high: float, integer: bool, expected: tuple[float, float]
) -> None:
    assert widened_range(low, high, integer) == pytest.approx(expected)


def _rules(suite: dict, column: str | None = None) -> dict[str, dict]:
    return {
        e["type"]: e["kwargs"]
        for e in suite["expectations"]
        if column is None or e["kwargs"].get("column") == column
    }


@pytest.fixture
def sample() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    n = 100
    bmi = rng.normal(25, 4, n)
    bmi[:20] = np.nan  # 80 % present
    return pd.DataFrame(
        {
            "age": rng.integers(18, 90, n),
            "bmi": bmi,
            "city": rng.choice(["rome", "berlin", "paris"], n),
            "note": [f"free text {i}" for i in range(n)],
            "smoker": rng.choice([True, False], n),
            "y": rng.integers(0, 3, n),
        }
    )


def test_table_rules_columns_and_row_bounds(sample: pd.DataFrame) -> None:
    suite = draft_suite(sample, name="s", label="y")
    table = _rules(suite)
    assert table["expect_table_columns_to_match_set"] == {
        "column_set": ["age", "bmi", "city", "note", "smoker", "y"],
        "exact_match": True,
    }
    assert table["expect_table_row_count_to_be_between"] == {
        "min_value": 10,
        "max_value": 1_000_000,
    }
    assert suite["meta"]["fedround"]["draft"] is True
    assert "review" in suite["meta"]["fedround"]["review"].lower()


def test_nulls_strict_without_gaps_mostly_with_a_margin_otherwise(sample: pd.DataFrame) -> None:
    suite = draft_suite(sample, name="s")
    assert _rules(suite, "age")["expect_column_values_to_not_be_null"] == {"column": "age"}
    assert _rules(suite, "bmi")["expect_column_values_to_not_be_null"]["mostly"] == 0.75


def test_sets_for_small_string_columns_and_the_label_ranges_for_numbers(
    sample: pd.DataFrame,
) -> None:
    suite = draft_suite(sample, name="s", label="y")
    assert _rules(suite, "city")["expect_column_values_to_be_in_set"]["value_set"] == [
        "berlin",
        "paris",
        "rome",
    ]
    assert _rules(suite, "smoker")["expect_column_values_to_be_in_set"]["value_set"] == [
        False,
        True,
    ]
    assert "expect_column_values_to_be_in_set" not in _rules(suite, "note")  # 100 distinct
    label = _rules(suite, "y")
    assert label["expect_column_values_to_be_in_set"]["value_set"] == [0, 1, 2]
    assert label["expect_column_unique_value_count_to_be_between"]["min_value"] == 2
    assert "expect_column_values_to_be_between" not in label  # a class label has no range
    age = _rules(suite, "age")["expect_column_values_to_be_between"]
    assert age["min_value"] <= sample["age"].min() and age["max_value"] >= sample["age"].max()
    assert isinstance(age["min_value"], int)


def test_a_named_categorical_column_gets_its_set_even_when_large() -> None:
    codes = pd.DataFrame({"ward": [f"w{i:02d}" for i in range(MAX_AUTO_CATEGORIES + 5)] * 2})
    suite = draft_suite(codes, name="s", categorical=["ward"])
    assert len(_rules(suite, "ward")["expect_column_values_to_be_in_set"]["value_set"]) == 25
    assert "expect_column_values_to_be_in_set" not in _rules(draft_suite(codes, name="s"), "ward")


def test_unknown_columns_and_empty_samples_are_refused(sample: pd.DataFrame) -> None:
    with pytest.raises(DraftError, match=r"\['outcome'\] are not in the sample"):
        draft_suite(sample, name="s", label="outcome")
    with pytest.raises(DraftError, match="no rows"):
        draft_suite(sample.head(0), name="s")
