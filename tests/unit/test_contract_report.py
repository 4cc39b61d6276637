"""How a failed contract reads: each broken rule once, a missing column once with its rules."""

from __future__ import annotations

import pytest

from fedround.tasks.core.contract_report import (
    MISSING_COLUMN,
    ContractReport,
    RuleResult,
    classify_reports,
)


def _missing(column: str, rule: str) -> RuleResult:
    return RuleResult(
        rule=rule, column=column, success=False, error=f"column {column!r} {MISSING_COLUMN} ['a'])"
    )


def test_a_missing_column_is_named_once_with_every_rule_that_needs_it() -> None:
    report = ContractReport(
        site="site-x",
        suite="tables",
        success=False,
        row_count=10,
        results=[
            _missing("bmi", "expect_column_to_exist"),
            RuleResult(
                rule="expect_column_values_to_be_between",
                column="age",
                success=False,
                arguments={"min_value": 0, "max_value": 120},
                unexpected_count=3,
            ),
            _missing("bmi", "expect_column_values_to_not_be_null"),
            RuleResult(rule="expect_table_row_count_to_be_between", success=True),
        ],
    )
    summary = report.summary()
    assert summary.count("column 'bmi' is missing") == 1
    assert (
        "rules that need it: expect_column_to_exist, expect_column_values_to_not_be_null" in summary
    )
    assert "column 'age' broke expect_column_values_to_be_between(min_value=0, " in summary
    assert summary.index("'bmi'") < summary.index("'age'")  # in the suite's order
    assert "row_count" not in summary  # a passed rule is not listed


def test_a_passing_report_says_how_many_rows() -> None:
    report = ContractReport(site="s", suite="t", success=True, row_count=5, results=[])
    assert report.summary() == "site s: 5 rows pass suite 't'"


def _passed(site: str, rows: int) -> ContractReport:
    return ContractReport(site=site, suite="s", success=True, row_count=rows, results=[])


@pytest.mark.security("self-reported-weight")
def test_a_site_claiming_more_rows_than_the_limit_is_left_out_not_trusted() -> None:
    outcomes: dict[str, ContractReport | BaseException] = {
        "honest": _passed("honest", 500),
        "boastful": _passed("boastful", 10**12),
        "empty": _passed("empty", 0),
        "broken": TimeoutError("no answer"),
        "at-limit": _passed("at-limit", 1000),
    }
    passed, excluded = classify_reports(outcomes, max_rows=1000)
    assert sorted(passed) == ["at-limit", "honest"]
    assert (
        "reports 1000000000000 rows, outside 1..limits.max_examples_per_site=1000"
        in (excluded["boastful"])
    )
    assert "reports 0 rows" in excluded["empty"]
    assert excluded["broken"] == "site broken: data contract could not run: no answer"
