"""Federated preprocessing of tables: per-site summaries merge into exactly the statistics of
the pooled table, rare and unknown categories map to ``other``, and a site's claims are
bounded by what its data contract checked."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedround.tasks.core.config import TableConfig
from fedround.tasks.core.preprocessing import (
    MAX_VALUE_CHARS,
    OTHER,
    ColumnStats,
    SiteSummary,
    bound_summary,
    merge_summaries,
    summarize_table,
)

TABLE = TableConfig(features=["age", "income", "city"], categorical=["city"], label="y")


def frame(
    ages: list[float], incomes: list[float], cities: list[str], ys: list[int]
) -> pd.DataFrame:
    return pd.DataFrame({"age": ages, "income": incomes, "city": cities, "y": ys})


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.tuples(
            st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
            st.floats(0, 1e5, allow_nan=False, allow_infinity=False),
        ),
        min_size=4,
        max_size=60,
    ),
    cuts=st.lists(st.integers(0, 60), min_size=0, max_size=4),
)
def test_merged_site_summaries_give_the_pooled_mean_and_std(
    values: list[tuple[float, float]], cuts: list[int]
) -> None:
    # Prepare: one table, split into sites at random points (some sites may be empty)
    pooled = frame(
        [a for a, _ in values],
        [b for _, b in values],
        ["x"] * len(values),
        [i % 2 for i in range(len(values))],
    )
    edges = sorted({0, len(values), *(min(c, len(values)) for c in cuts)})
    parts = [pooled.iloc[lo:hi] for lo, hi in itertools.pairwise(edges)]

    # Execute
    merged = merge_summaries([summarize_table(p, TABLE) for p in parts], TABLE)

    # Assert: the centralized statistics (population std; constant columns get std 1)
    for column in ("age", "income"):
        data = pooled[column].to_numpy(np.float64)
        expected_std = float(data.std())
        assert merged.means[column] == pytest.approx(data.mean(), rel=1e-9, abs=1e-6)
        if expected_std > 1e-3 * max(1.0, float(np.abs(data).max())):
            assert merged.stds[column] == pytest.approx(expected_std, rel=1e-6, abs=1e-6)
    assert merged.rows == len(values)
    assert merged.sites == len(parts)


def test_exact_mean_and_std_and_transform_of_a_small_example() -> None:
    # Prepare: two sites; pooled ages [1, 2, 3, 6] → mean 3, population variance 3.5
    a = frame([1.0, 2.0], [10.0, 10.0], ["x", "x"], [0, 1])
    b = frame([3.0, 6.0], [10.0, 10.0], ["x", "x"], [1, 0])

    # Execute
    prep = merge_summaries([summarize_table(a, TABLE), summarize_table(b, TABLE)], TABLE)
    inputs = prep.transform_features(frame([6.0], [10.0], ["x"], [0]))

    # Assert: income is constant → std 1 (never a division by zero)
    assert prep.means == {"age": 3.0, "income": 10.0}
    assert prep.stds == {"age": pytest.approx(math.sqrt(3.5)), "income": 1.0}
    assert inputs[0, 0] == pytest.approx(3.0 / math.sqrt(3.5))
    assert inputs[0, 1] == 0.0


def test_rare_and_unknown_categories_map_to_other() -> None:
    # Prepare: 'berlin' 5 times over two sites (kept), 'oslo' 4 times (rare), min count 5
    table = TABLE.model_copy(update={"min_category_count": 5})
    a = frame([1.0] * 5, [1.0] * 5, ["berlin"] * 3 + ["oslo"] * 2, [0, 1, 0, 1, 0])
    b = frame([1.0] * 4, [1.0] * 4, ["berlin"] * 2 + ["oslo"] * 2, [1, 0, 1, 0])
    prep = merge_summaries([summarize_table(a, table), summarize_table(b, table)], table)

    # Execute
    inputs = prep.transform_features(
        frame([1.0] * 3, [1.0] * 3, ["berlin", "oslo", "rome"], [0] * 3)
    )

    # Assert: columns age, income, city=berlin, city=__other__
    assert prep.vocabularies == {"city": ["berlin"]}
    assert prep.feature_names == ["age", "income", "city=berlin", f"city={OTHER}"]
    assert prep.n_features == 4
    assert inputs[:, 2:].tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]


def test_missing_category_goes_to_other() -> None:
    table = TABLE.model_copy(update={"min_category_count": 1})
    prep = merge_summaries(
        [summarize_table(frame([1.0, 2.0], [1.0, 2.0], ["a", "b"], [0, 1]), table)], table
    )
    inputs = prep.transform_features(
        pd.DataFrame({"age": [1.0], "income": [1.0], "city": [None], "y": [0]})
    )
    assert prep.vocabularies == {"city": ["a", "b"]}
    assert inputs[0, 2:].tolist() == [0.0, 0.0, 1.0]


def test_missing_numerics_impute_to_the_mean_which_standardizes_to_zero() -> None:
    # Prepare: a site with a missing age; the mean counts only present values: (2 + 4) / 2
    site = pd.DataFrame(
        {"age": [2.0, None, 4.0], "income": [1.0, 2.0, 3.0], "city": ["x"] * 3, "y": [0, 1, 0]}
    )
    prep = merge_summaries([summarize_table(site, TABLE)], TABLE)

    # Execute
    inputs = prep.transform_features(site)

    # Assert
    assert prep.means["age"] == 3.0
    assert inputs[1, 0] == 0.0
    assert inputs[0, 0] == pytest.approx(-1.0) and inputs[2, 0] == pytest.approx(1.0)


def test_label_classes_are_ordered_numerically() -> None:
    # Prepare: labels as they come from CSV/parquet: ints at one site, floats at another
    a = frame([1.0] * 4, [1.0] * 4, ["x"] * 4, [10, 2, 1, 0])
    b = pd.DataFrame(
        {"age": [1.0, 1.0], "income": [1.0, 1.0], "city": ["x", "x"], "y": [2.0, 10.0]}
    )

    # Execute
    prep = merge_summaries([summarize_table(a, TABLE), summarize_table(b, TABLE)], TABLE)
    _, labels = prep.transform(a)

    # Assert: 0, 1, 2, 10 (not the string order 0, 1, 10, 2)
    assert prep.classes == ["0", "1", "2", "10"]
    assert prep.n_outputs == 4
    assert labels.tolist() == [3, 2, 1, 0]


def test_rows_with_missing_or_unknown_labels_are_left_out() -> None:
    prep = merge_summaries(
        [summarize_table(frame([1.0, 2.0], [1.0, 2.0], ["x", "x"], [0, 1]), TABLE)], TABLE
    )
    rows = pd.DataFrame(
        {"age": [1.0, 2.0, 3.0], "income": [1.0] * 3, "city": ["x"] * 3, "y": [1, None, 7]}
    )
    inputs, labels = prep.transform(rows)
    # city 'x' is rare (2 < 5): columns age, income, city=__other__
    assert labels.tolist() == [1]
    assert inputs.shape == (1, 3)
    assert inputs[0].tolist() == [-1.0, -1.0, 1.0]


def test_a_single_label_class_is_refused_with_a_clear_error() -> None:
    site = frame([1.0, 2.0], [1.0, 2.0], ["x", "x"], [1, 1])
    with pytest.raises(ValueError, match=r"label 'y' has 1 class\(es\) across all sites"):
        merge_summaries([summarize_table(site, TABLE)], TABLE)


def test_regression_targets_are_floats() -> None:
    table = TableConfig(features=["age"], label="y", task="regression")
    site = pd.DataFrame({"age": [1.0, 3.0], "y": [0.5, 1.5]})
    prep = merge_summaries([summarize_table(site, table)], table)
    inputs, targets = prep.transform(site)
    assert prep.classes == [] and prep.n_outputs == 1
    assert targets.dtype == np.float32 and targets.tolist() == [0.5, 1.5]
    assert inputs[:, 0].tolist() == [-1.0, 1.0]


def test_numeric_none_keeps_raw_values() -> None:
    table = TABLE.model_copy(update={"numeric": "none"})
    site = frame([5.0, 7.0], [1.0, 2.0], ["x", "x"], [0, 1])
    prep = merge_summaries([summarize_table(site, table)], table)
    assert prep.transform_features(site)[:, 0].tolist() == [5.0, 7.0]


@pytest.mark.security("self-reported-weight")
def test_bound_summary_clips_an_inflated_row_count_and_scales_its_sums() -> None:
    # Prepare: a site claims 10**12 rows of age 50; its contract checked 100 rows
    claim = SiteSummary(
        rows=10**12,
        numeric={"age": ColumnStats(count=10**12, sum=50.0 * 10**12, sum_sq=2500.0 * 10**12)},
        categories={"city": {"x": 10**12}},
        labels={"0": 10**12, "1": 5},
    )
    honest = summarize_table(frame([10.0] * 100, [1.0] * 100, ["x"] * 100, [0, 1] * 50), TABLE)

    # Execute
    bounded = bound_summary(claim, TABLE, max_rows=100)
    merged = merge_summaries([bounded, honest], TABLE)

    # Assert: its weight is its 100 rows, its mean is still 50
    assert bounded.rows == 100
    assert bounded.numeric["age"].count == 100
    assert bounded.numeric["age"].sum == pytest.approx(5000.0)
    assert bounded.numeric["age"].sum_sq == pytest.approx(250000.0)
    assert bounded.categories == {"city": {"x": 100}}
    assert bounded.labels == {"0": 95, "1": 4}  # 105 label counts scaled to 100 rows
    assert merged.means["age"] == pytest.approx(30.0)  # (100·50 + 100·10) / 200
    assert merged.rows == 200


def test_bound_summary_drops_non_finite_stats_undeclared_columns_and_long_names() -> None:
    claim = SiteSummary(
        rows=3,
        numeric={
            "age": ColumnStats(count=3, sum=float("inf"), sum_sq=1.0),
            "income": ColumnStats(count=3, sum=float("nan"), sum_sq=1.0),
            "salary": ColumnStats(count=3, sum=3.0, sum_sq=3.0),  # not a declared feature
        },
        categories={"city": {"z" * 5000: 3}, "secret": {"a": 3}},
        labels={"0": 1, "1": 1, "q" * 5000: 1},
    )

    bounded = bound_summary(claim, TABLE, max_rows=3)

    assert bounded.numeric == {"age": ColumnStats(count=0), "income": ColumnStats(count=0)}
    assert set(bounded.categories) == {"city"}
    assert bounded.categories["city"] == {"z" * MAX_VALUE_CHARS: 3}
    assert all(len(k) <= MAX_VALUE_CHARS for k in bounded.labels)
    assert bounded.labels["0"] == 1


def test_bound_summary_keeps_at_most_max_categories() -> None:
    table = TABLE.model_copy(update={"max_categories": 2})
    claim = SiteSummary(rows=50, categories={"city": {"a": 10, "b": 30, "c": 20, "d": 1}})
    assert bound_summary(claim, table, max_rows=50).categories == {"city": {"b": 30, "c": 20}}


def test_bound_summary_clamps_negative_counts() -> None:
    claim = SiteSummary(rows=5, labels={"0": -1000, "1": 5})
    assert bound_summary(claim, TABLE, max_rows=5).labels == {"0": 0, "1": 5}


def test_preprocessor_roundtrips_through_json_with_the_same_digest() -> None:
    site = frame([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], ["x", "y", "x"], [0, 1, 0])
    prep = merge_summaries([summarize_table(site, TABLE)], TABLE)
    again = type(prep).model_validate_json(prep.model_dump_json())
    assert again == prep and again.sha256() == prep.sha256()
    assert len(prep.sha256()) == 64


def test_a_site_cannot_claim_more_category_or_label_counts_than_rows() -> None:
    # Prepare: a site whose contract checked 10 rows claims 10 of each of three categories
    # (30 rows' worth) to push 'c' past min_category_count at the honest site's expense
    table = TABLE.model_copy(update={"min_category_count": 8})
    claim = SiteSummary(
        rows=10,
        categories={"city": {"a": 10, "b": 10, "c": 10}},
        labels={"0": 10, "1": 10},
    )
    honest = summarize_table(frame([1.0] * 4, [1.0] * 4, ["c"] * 4, [0, 1, 0, 1]), table)

    # Execute
    bounded = bound_summary(claim, table, max_rows=10)
    merged = merge_summaries([bounded, honest], table)

    # Assert: per column, the counts add up to at most the rows checked
    assert sum(bounded.categories["city"].values()) <= 10
    assert sum(bounded.labels.values()) <= 10
    assert bounded.categories["city"] == {"a": 3, "b": 3, "c": 3}
    assert merged.vocabularies["city"] == []  # c: 3 + 4 = 7 < 8
