"""The data-contract summary a site sends back: rule outcomes, never the data itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .preprocessing import SiteSummary


class RuleResult(BaseModel):
    """The outcome of one rule (one Great Expectations expectation)."""

    model_config = ConfigDict(frozen=True)

    rule: str
    column: str | None = None
    success: bool
    arguments: dict[str, Any] = Field(default_factory=dict)
    unexpected_count: int | None = None
    # No row values ever: the offending values are counted at the site, not sent.
    observed: Any = None
    error: str | None = None

    def describe(self) -> str:
        where = f"column {self.column!r}" if self.column else "table"
        shown = {k: v for k, v in self.arguments.items() if k not in {"column", "batch_id"}}
        args = ", ".join(f"{k}={v}" for k, v in shown.items())
        text = f"{where} broke {self.rule}({args})"
        if self.error:
            return f"{text}: {self.error}"
        if self.unexpected_count:
            text += f": {self.unexpected_count} rows"
        elif self.observed is not None:
            text += f": observed {self.observed}"
        return text


MISSING_COLUMN = "is missing (columns present:"


class ContractReport(BaseModel):
    """A site's data-contract result."""

    model_config = ConfigDict(frozen=True)

    site: str
    suite: str
    success: bool
    row_count: int
    results: list[RuleResult]
    # Tables: the set-up summary (per-column counts and sums) for federated preprocessing.
    data_summary: SiteSummary | None = None
    # Arrays: examples per label class (counts only), for the run's label-skew report.
    label_counts: dict[str, int] | None = None

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.results if not r.success]

    def summary(self) -> str:
        if self.success:
            return f"site {self.site}: {self.row_count} rows pass suite {self.suite!r}"
        parts: list[str] = []
        missing: dict[str, tuple[int, list[str]]] = {}  # a missing column is said once
        for result in self.failures:
            if result.column is not None and result.error and MISSING_COLUMN in result.error:
                if result.column not in missing:
                    missing[result.column] = (len(parts), [])
                    parts.append(result.error)
                missing[result.column][1].append(result.rule)
            else:
                parts.append(result.describe())
        for index, rules in missing.values():
            parts[index] += f"; rules that need it: {', '.join(rules)}"
        return f"site {self.site} fails data contract {self.suite!r}: {'; '.join(parts)}"


def classify_reports(
    outcomes: Mapping[str, ContractReport | BaseException], max_rows: int
) -> tuple[dict[str, ContractReport], dict[str, str]]:
    """The sites whose data passed their contract, and the others with the reason: failed
    rules, a contract that could not run, or more rows claimed than ``max_rows`` (a site
    reports its own row count, and its update's weight follows it: an absurd claim is not
    trusted)."""
    passed: dict[str, ContractReport] = {}
    excluded: dict[str, str] = {}
    for site, report in outcomes.items():
        if not isinstance(report, ContractReport):
            excluded[site] = f"site {site}: data contract could not run: {report}"
        elif not report.success:
            excluded[site] = report.summary()
        elif not 0 < report.row_count <= max_rows:
            excluded[site] = (
                f"site {site}: its data contract reports {report.row_count} rows, outside "
                f"1..limits.max_examples_per_site={max_rows}; a site's weight follows the rows "
                "it reports, so the claim is not trusted (raise the limit if it is real)"
            )
        else:
            passed[site] = report
    return passed, excluded
