"""The data contract, checked at the site with Great Expectations before it trains.

The suite is the federation's (a GE suite in JSON); the data is the site's own. Only the
:class:`ContractReport` (rule outcomes, counts, at most three sample values per rule)
leaves the site.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from fedround.tasks.core.contract_report import ContractReport, RuleResult
from fedround.tasks.core.errors import ContractError

from .data import profile_frame, read_arrays

log = logging.getLogger(__name__)

SAMPLE_VALUES = 3


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def validate_frame(frame: pd.DataFrame, suite: dict[str, Any], site: str) -> ContractReport:
    """Run a GE suite (its JSON form) over a frame and summarise the outcome."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    name = str(suite.get("name", "contract"))
    try:
        gx_suite = gx.ExpectationSuite(**suite)
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
            error = f"column {column!r} is missing (columns present: {sorted(frame.columns)})"
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
                unexpected_sample=_jsonable(details.get("partial_unexpected_list") or [])[
                    :SAMPLE_VALUES
                ],
                observed=_jsonable(details.get("observed_value")),
                error=error,
            )
        )
    return ContractReport(
        site=site, suite=name, success=bool(outcome.success), row_count=len(frame), results=results
    )


def check_site_contract(data_file: Path, suite: dict[str, Any], site: str) -> ContractReport:
    """Validate a site's data file; unreadable data is a failed contract, not a crash."""
    name = str(suite.get("name", "contract"))
    try:
        frame = profile_frame(read_arrays(data_file))
    except (OSError, ValueError) as exc:
        log.warning("site %s: cannot read %s: %s", site, data_file, exc)
        failure = RuleResult(rule="readable_data", success=False, error=f"{data_file.name}: {exc}")
        return ContractReport(site=site, suite=name, success=False, row_count=0, results=[failure])
    report = validate_frame(frame, suite, site)
    log.info(report.summary())
    return report
