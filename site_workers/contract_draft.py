"""Draft a data contract (a Great Expectations suite, our JSON form) from one sample table.

The operator runs this on a sample of their *own* data, reviews the draft and commits it
with the federation config (``contract:``). The draft reads values of the sample into the
suite (ranges, category sets): that is fine for a file its owner drafts from and reviews,
and it is why the draft is marked as one in its ``meta``. GE 1.x no longer ships the
profilers that once did this, so the rules are fedround's own, and deliberately simple:

- **columns**: ``expect_table_columns_to_match_set`` with the sample's columns, exact match;
- **rows**: ``expect_table_row_count_to_be_between``: at least :data:`MIN_ROWS` (or the
  sample's rows when it has fewer), at most the next power of ten above 100 × the sample's
  rows and never below :data:`MIN_MAX_ROWS`;
- **types**: ``expect_column_values_to_be_in_type_list`` per column, by family: any integer
  or float dtype for a numeric column (a CSV turns an integer column with a gap into
  floats), ``bool``/``boolean``, strings (``str``; pandas' string dtypes), categories,
  datetimes (the sample's dtype);
- **missing values**: ``expect_column_values_to_not_be_null``, strict when the sample has no
  nulls in the column, else ``mostly`` = the sample's non-null share minus
  :data:`NULL_MARGIN`, rounded down to two decimals (no rule when that is ≤ 0);
- **numeric ranges**: ``expect_column_values_to_be_between`` with the sample's min and max
  widened by :data:`RANGE_MARGIN` (10 %) of the range on each side (of the value itself
  when the column is constant), rounded outwards to the margin's leading digit (whole
  numbers for integer columns); a column whose sample is non-negative stays so;
- **categories**: ``expect_column_values_to_be_in_set`` with the sample's distinct values for
  string, boolean and categorical columns with at most :data:`MAX_AUTO_CATEGORIES` distinct
  values, for every column named as categorical (up to :data:`MAX_CATEGORIES`), and for a
  classification label;
- **label sanity**: ``expect_column_unique_value_count_to_be_between`` with at least 2
  distinct labels (a constant label is a broken export). Every class need not be present
  at every site: non-IID sites legitimately lack some, so the draft does not demand it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import DataError, read_table

if TYPE_CHECKING:
    import pandas as pd

RANGE_MARGIN = 0.10
NULL_MARGIN = 0.05
MIN_ROWS = 10
MIN_MAX_ROWS = 1_000_000
MAX_AUTO_CATEGORIES = 20
MAX_CATEGORIES = 1000

NUMERIC_TYPES = [
    *(f"int{b}" for b in (8, 16, 32, 64)),
    *(f"uint{b}" for b in (8, 16, 32, 64)),
    *(f"float{b}" for b in (16, 32, 64)),
    *(f"Int{b}" for b in (8, 16, 32, 64)),
    *(f"UInt{b}" for b in (8, 16, 32, 64)),
    "Float32",
    "Float64",
    "int",
    "float",
]
BOOL_TYPES = ["bool", "boolean", "BooleanDtype"]
STRING_TYPES = ["str", "StringDtype"]
CATEGORY_TYPES = ["category", "CategoricalDtype"]
LOW_CARDINALITY = {"string", "boolean", "category"}  # families whose values may form a set

RULES_DOC = (
    "columns: exact set; rows: >= min(10, sample rows), <= max(1e6, next power of ten above "
    "100 x sample rows); types: by family (numeric: any int/float dtype); nulls: strict, or "
    f"mostly = non-null share - {NULL_MARGIN} (2 decimals, floor); numeric ranges: sample "
    f"min/max widened by {RANGE_MARGIN:.0%} of the range, rounded outwards; categories: the "
    f"sample's values for string/bool columns with <= {MAX_AUTO_CATEGORIES} distinct values, "
    "named categorical columns and a classification label; label: >= 2 distinct values"
)


class DraftError(ValueError):
    """The sample cannot be drafted from (no rows, unknown label, ...); says what to fix."""


def _name_from(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-") or "site-data"
    return f"{stem}-contract"


def _python(value: Any) -> Any:
    """A JSON-able scalar: numpy numbers as Python numbers, whole floats as ints."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _sorted_values(values: Sequence[Any]) -> list[Any]:
    return sorted(values, key=lambda v: (not isinstance(v, int | float), str(type(v)), v))


def _round_out(low: float, high: float, step: float) -> tuple[float, float]:
    decimals = max(0, -math.floor(math.log10(step)))
    slack = 1e-9  # 0.02 / 0.01 is 1.9999999999999998 in floating point
    return (
        round(math.floor(low / step + slack) * step, decimals),
        round(math.ceil(high / step - slack) * step, decimals),
    )


def widened_range(low: float, high: float, integer: bool) -> tuple[float, float]:
    """The sample's ``[low, high]`` widened by :data:`RANGE_MARGIN` and rounded outwards."""
    span = high - low
    margin = RANGE_MARGIN * (span if span > 0 else max(abs(low), abs(high), 1.0))
    lower, upper = low - margin, high + margin
    if low >= 0 > lower:
        lower = 0.0  # a non-negative quantity (a count, an age) stays non-negative
    step = 10.0 ** math.floor(math.log10(margin))
    if integer:
        step = max(step, 1.0)
    lower, upper = _round_out(lower, upper, step)
    if integer or step >= 1:
        return float(int(lower)), float(int(upper))
    return lower, upper


def _number(value: float, integer: bool) -> int | float:
    return int(value) if integer or float(value).is_integer() else value


def _type_rule(series: pd.Series) -> tuple[str, list[str]]:
    """The column's family and the dtypes it may have at a site."""
    import pandas as pd
    from pandas.api import types

    if types.is_bool_dtype(series):
        return "boolean", BOOL_TYPES
    if isinstance(series.dtype, pd.CategoricalDtype):
        return "category", CATEGORY_TYPES
    if types.is_numeric_dtype(series):
        return "numeric", NUMERIC_TYPES
    if types.is_datetime64_any_dtype(series):
        return "datetime", [str(series.dtype)]
    if types.is_string_dtype(series) or types.is_object_dtype(series):
        return "string", STRING_TYPES
    return "other", [str(series.dtype)]


def _expect(kind: str, **kwargs: Any) -> dict[str, Any]:
    return {"type": kind, "kwargs": kwargs}


def draft_suite(
    frame: pd.DataFrame,
    *,
    name: str,
    label: str | None = None,
    categorical: Sequence[str] = (),
    source: str | None = None,
) -> dict[str, Any]:
    """A draft suite (``{"name", "meta", "expectations"}``) that the sample itself passes."""
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        raise DraftError(f"the sample repeats column names: {columns}")
    frame = frame.set_axis(columns, axis=1)
    rows = len(frame)
    if rows == 0:
        raise DraftError("the sample has no rows: draft from a file with data in it")
    unknown = sorted({*categorical, *([label] if label else [])} - set(columns))
    if unknown:
        raise DraftError(f"columns {unknown} are not in the sample (columns: {columns})")

    max_rows = max(MIN_MAX_ROWS, 10 ** math.ceil(math.log10(100 * rows)))
    expectations = [
        _expect("expect_table_columns_to_match_set", column_set=columns, exact_match=True),
        _expect(
            "expect_table_row_count_to_be_between",
            min_value=min(MIN_ROWS, rows),
            max_value=max_rows,
        ),
    ]
    families: dict[str, str] = {}
    for column in columns:
        series = frame[column]
        family, type_list = _type_rule(series)
        families[column] = family
        expectations.append(
            _expect("expect_column_values_to_be_in_type_list", column=column, type_list=type_list)
        )
        present = series.notna()
        share = float(present.mean())
        if share == 1.0:
            expectations.append(_expect("expect_column_values_to_not_be_null", column=column))
        else:
            mostly = math.floor((share - NULL_MARGIN) * 100) / 100
            if mostly > 0:
                expectations.append(
                    _expect("expect_column_values_to_not_be_null", column=column, mostly=mostly)
                )
        values = series[present]
        distinct = values.drop_duplicates()
        is_label = column == label
        numeric_label = family == "numeric" and len(distinct) > MAX_AUTO_CATEGORIES
        wants_set = (
            column in categorical
            or (is_label and not numeric_label)
            or (
                family in {"string", "boolean", "category"} and len(distinct) <= MAX_AUTO_CATEGORIES
            )
        )
        if family == "numeric" and len(values) and column not in categorical:
            numbers = pd.to_numeric(values, errors="coerce")
            finite = numbers[numbers.map(math.isfinite)]
            if len(finite) and not (is_label and not numeric_label):
                integer = pd.api.types.is_integer_dtype(series)
                low, high = widened_range(float(finite.min()), float(finite.max()), integer)
                expectations.append(
                    _expect(
                        "expect_column_values_to_be_between",
                        column=column,
                        min_value=_number(low, integer),
                        max_value=_number(high, integer),
                    )
                )
        if wants_set and 0 < len(distinct) <= MAX_CATEGORIES:
            expectations.append(
                _expect(
                    "expect_column_values_to_be_in_set",
                    column=column,
                    value_set=_sorted_values([_python(v) for v in distinct]),
                )
            )
        if is_label:
            expectations.append(
                _expect(
                    "expect_column_unique_value_count_to_be_between", column=column, min_value=2
                )
            )
    return {
        "name": name,
        "meta": {
            "fedround": {
                "draft": True,
                "generated_by": "fedround contract draft",
                "source": source,
                "sample_rows": rows,
                "label": label,
                "categorical": sorted(categorical),
                "column_families": families,
                "rules": RULES_DOC,
                "review": (
                    "DRAFT: drafted from one sample's own values (ranges, category sets). "
                    "Review every rule against what all sites may legitimately hold (other "
                    "sites' ranges, classes a sample lacks), then commit this file with the "
                    "federation config (contract: <this file>)."
                ),
            }
        },
        "expectations": expectations,
    }


def suite_json(suite: dict[str, Any]) -> str:
    """The suite as reviewable JSON: one expectation per line (diffs show one rule each)."""
    import json

    rules = ",\n".join(f"    {json.dumps(e)}" for e in suite["expectations"])
    meta = json.dumps(suite.get("meta", {}), indent=2).replace("\n", "\n  ")
    return (
        "{\n"
        f'  "name": {json.dumps(suite["name"])},\n'
        f'  "meta": {meta},\n'
        f'  "expectations": [\n{rules}\n  ]\n'
        "}\n"
    )


def draft_suite_from_file(
    path: Path,
    *,
    name: str | None = None,
    label: str | None = None,
    categorical: Sequence[str] = (),
    loader: str | None = None,
) -> dict[str, Any]:
    """Read one sample (Parquet, CSV or the federation's ``loader``) and draft its suite."""
    if path.suffix.lower() == ".npz" and loader is None:
        raise DataError(
            f"{path.name}: drafting reads tables (Parquet, CSV); an .npz federation's contract "
            "checks a per-example profile, see deployments/examples/contracts/"
        )
    frame = read_table(path, loader)
    return draft_suite(
        frame,
        name=name or _name_from(path),
        label=label,
        categorical=categorical,
        source=path.name,
    )
