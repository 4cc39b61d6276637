"""The data contract, checked at the site with Great Expectations before it trains.

The suite is the federation's (a GE suite in JSON); the data is the site's own: for tables
the real columns of the site's table, for arrays a per-example profile. Only the
:class:`ContractReport` leaves the site: rule outcomes and counts, never a row value (the
offending values GE finds are counted, not sent; observed values are sent only when they
are a single number, e.g. a mean or a null fraction). For tables the report carries the
set-up summary (per-column counts and sums) the federated preprocessing is merged from.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedround.tasks.core.config import DataConfig
from fedround.tasks.core.contract_report import MISSING_COLUMN, ContractReport, RuleResult
from fedround.tasks.core.errors import ContractError
from fedround.tasks.core.preprocessing import MAX_LABEL_CLASSES, label_key, summarize_table
from fedround.tasks.core.usercode import UserCodeError

from .data import DataError, contract_frame

if TYPE_CHECKING:  # pandas is imported where frames are read, not by every site process
    import pandas as pd

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def import_great_expectations() -> None:
    """Import Great Expectations (seconds), without its usage analytics."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations  # noqa: F401


def validate_frame(frame: pd.DataFrame, suite: dict[str, Any], site: str) -> ContractReport:
    """Run a GE suite (its JSON form) over a frame and summarise the outcome."""
    import_great_expectations()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    name = str(suite.get("name", "contract"))
    try:
        gx_suite = gx.ExpectationSuite(**copy.deepcopy(suite))  # GE writes into its meta
    except Exception as exc:
        raise ContractError(f"data-contract suite {name!r} is not a valid GE suite: {exc}") from exc
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    gx_suite = context.suites.add(gx_suite)
    batch = (
        context.data_sources.add_pandas("site")
        .add_dataframe_asset("site-data")
        .add_batch_definition_whole_dataframe("whole")
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}-{site}", data=batch, suite=gx_suite)
    )
    outcome = definition.run(batch_parameters={"dataframe": frame})
    results = []
    for item in outcome.results:
        config = item.expectation_config
        assert config is not None  # every result of a suite run carries its expectation
        kwargs = {k: _jsonable(v) for k, v in config.kwargs.items() if k != "batch_id"}
        column = kwargs.get("column")
        error = None
        if not item.success and column is not None and column not in frame.columns:
            error = f"column {column!r} {MISSING_COLUMN} {sorted(frame.columns)})"
        elif item.exception_info and item.exception_info.get("raised_exception"):
            error = str(item.exception_info.get("exception_message"))
        details = item.result or {}
        results.append(
            RuleResult(
                rule=config.type,
                column=column,
                success=bool(item.success),
                arguments=kwargs,
                unexpected_count=details.get("unexpected_count"),
                observed=_aggregate_only(details.get("observed_value")),
                error=error,
            )
        )
    return ContractReport(
        site=site, suite=name, success=bool(outcome.success), row_count=len(frame), results=results
    )


def _aggregate_only(value: Any) -> Any:
    """An observed value may leave the site only when it is one number (not row values)."""
    value = _jsonable(value)
    return value if isinstance(value, int | float | bool) else None


def count_labels(frame: pd.DataFrame) -> dict[str, int] | None:
    """Examples per class of the profile's ``label`` column: counts only, for the run's
    label-skew report (at most ``MAX_LABEL_CLASSES`` classes, the most frequent)."""
    if "label" not in frame.columns:
        return None
    counts = frame["label"].dropna().map(label_key).value_counts()
    return {str(k): int(v) for k, v in counts.head(MAX_LABEL_CLASSES).items()}


def check_site_contract(
    data_file: Path, suite: dict[str, Any], site: str, data: DataConfig | None = None
) -> ContractReport:
    """Validate a site's data file; unreadable data is a failed contract, not a crash.

    For a table that passes, the report carries the site's set-up summary.
    """
    data = data or DataConfig()
    name = str(suite.get("name", "contract"))
    try:
        frame = contract_frame(data_file, data)
    except (OSError, ValueError, DataError, UserCodeError) as exc:
        log.warning("site %s: cannot read %s: %s", site, data_file, exc)
        reason = str(exc).replace(str(data_file), data_file.name)  # the path stays here
        failure = RuleResult(
            rule="readable_data", success=False, error=f"{data_file.name}: {reason}"
        )
        return ContractReport(site=site, suite=name, success=False, row_count=0, results=[failure])
    report = validate_frame(frame, suite, site)
    if report.success and data.kind == "table" and data.table is not None:
        declared = [*data.table.features, data.table.label]
        missing = [c for c in declared if c not in frame.columns]
        if missing:
            failure = RuleResult(
                rule="declared_columns",
                success=False,
                error=f"columns {missing} declared in the federation's data.table are missing "
                f"(columns present: {sorted(map(str, frame.columns))})",
            )
            report = report.model_copy(
                update={"success": False, "results": [*report.results, failure]}
            )
        else:
            summary = summarize_table(frame, data.table)
            report = report.model_copy(update={"data_summary": summary})
    elif report.success and data.kind == "arrays":
        report = report.model_copy(update={"label_counts": count_labels(frame)})
    log.info(report.summary())
    return report
