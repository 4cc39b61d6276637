"""Federated preprocessing of tables: statistics from per-site summaries, never one site.

1. Every site summarises its own table (:func:`summarize_table`): per numeric column the
   count of values, their sum and sum of squares, min and max; per categorical column
   the count of each category (at most ``max_categories`` kept); for classification the
   count of each label. No row leaves the site.
2. The coordinator bounds each summary by the rows the site's data contract checked
   (:func:`bound_summary`: a site cannot outweigh the others by claiming more rows) and
   merges them into a :class:`Preprocessor` (:func:`merge_summaries`): federated means and
   standard deviations, category vocabularies (categories seen fewer than
   ``min_category_count`` times across all sites map to ``other``), label classes.
3. Every site transforms its table with that preprocessor; the registered model carries
   it, so it serves raw rows.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from .config import TableConfig

if TYPE_CHECKING:
    import pandas as pd

OTHER = "__other__"
MAX_LABEL_CLASSES = 1000
MAX_VALUE_CHARS = 200


class ColumnStats(BaseModel):
    model_config = ConfigDict(frozen=True)

    count: int = Field(ge=0)
    sum: float = 0.0
    sum_sq: float = Field(0.0, ge=0)
    min: float | None = None
    max: float | None = None


class SiteSummary(BaseModel):
    """What a site tells the coordinator about its table in the set-up step."""

    model_config = ConfigDict(frozen=True)

    rows: int = Field(ge=0)
    numeric: dict[str, ColumnStats] = Field(default_factory=dict)
    categories: dict[str, dict[str, int]] = Field(default_factory=dict)
    labels: dict[str, int] = Field(default_factory=dict)  # classification
    target: ColumnStats | None = None  # regression


def label_key(value: object) -> str:
    """One spelling per label value, whatever file format it came from (1, 1.0, '1')."""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)[:MAX_VALUE_CHARS]


def _stats(values: npt.NDArray[np.float64]) -> ColumnStats:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return ColumnStats(count=0)
    return ColumnStats(
        count=len(finite),
        sum=float(finite.sum()),
        sum_sq=float((finite**2).sum()),
        min=float(finite.min()),
        max=float(finite.max()),
    )


def summarize_table(frame: pd.DataFrame, table: TableConfig) -> SiteSummary:
    """A site's summary of its own table (counts and sums only)."""
    import pandas as pd

    numeric = {
        column: _stats(pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64))
        for column in table.numeric_features
    }
    categories = {}
    for column in table.categorical:
        counts = frame[column].dropna().map(label_key).value_counts()
        categories[column] = {str(k): int(v) for k, v in counts.head(table.max_categories).items()}
    labels: dict[str, int] = {}
    target = None
    if table.task == "classification":
        counts = frame[table.label].dropna().map(label_key).value_counts()
        labels = {str(k): int(v) for k, v in counts.head(MAX_LABEL_CLASSES).items()}
    else:
        target = _stats(pd.to_numeric(frame[table.label], errors="coerce").to_numpy(np.float64))
    return SiteSummary(
        rows=len(frame), numeric=numeric, categories=categories, labels=labels, target=target
    )


def bound_summary(summary: SiteSummary, table: TableConfig, max_rows: int) -> SiteSummary:
    """Clip a site-reported summary to what the site can have: counts ≤ the rows its data
    contract checked, only the declared columns, finite sums, bounded vocabularies.
    Sums are scaled down with clipped counts, so a site's weight never exceeds its rows."""

    def column(stats: ColumnStats) -> ColumnStats:
        values = (stats.sum, stats.sum_sq, stats.min or 0.0, stats.max or 0.0)
        if not all(math.isfinite(v) for v in values):
            return ColumnStats(count=0)
        count = min(stats.count, max_rows)
        scale = count / stats.count if stats.count else 0.0
        return ColumnStats(
            count=count,
            sum=stats.sum * scale,
            sum_sq=stats.sum_sq * scale,
            min=stats.min,
            max=stats.max,
        )

    def counts(values: dict[str, int], limit: int) -> dict[str, int]:
        top = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        clipped = {k[:MAX_VALUE_CHARS]: min(max(int(v), 0), max_rows) for k, v in top}
        total = sum(clipped.values())
        if total > max_rows:  # one column's counts add up to at most the rows checked
            clipped = {k: v * max_rows // total for k, v in clipped.items()}
        return clipped

    return SiteSummary(
        rows=min(summary.rows, max_rows),
        numeric={
            c: column(summary.numeric[c]) for c in table.numeric_features if c in summary.numeric
        },
        categories={
            c: counts(summary.categories[c], table.max_categories)
            for c in table.categorical
            if c in summary.categories
        },
        labels=counts(summary.labels, MAX_LABEL_CLASSES),
        target=column(summary.target) if summary.target is not None else None,
    )


class Preprocessor(BaseModel):
    """The federation's table transformation: raw rows → model inputs (and labels)."""

    model_config = ConfigDict(frozen=True)

    features: list[str]
    categorical: list[str]
    label: str
    task: Literal["classification", "regression"]
    means: dict[str, float]
    stds: dict[str, float]
    vocabularies: dict[str, list[str]]
    classes: list[str] = Field(default_factory=list)
    sites: int = 0
    rows: int = 0

    @property
    def feature_names(self) -> list[str]:
        names: list[str] = []
        for column in self.features:
            if column in self.vocabularies:
                names += [f"{column}={v}" for v in self.vocabularies[column]]
                names.append(f"{column}={OTHER}")
            else:
                names.append(column)
        return names

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    def sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def transform_features(self, frame: pd.DataFrame) -> npt.NDArray[np.float32]:
        """Raw rows → float32 inputs: standardized numerics (missing → the federated mean),
        one-hot categories (unknown or rare → ``other``)."""
        import pandas as pd

        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise ValueError(f"the table lacks feature columns {missing}")
        blocks: list[npt.NDArray[np.float32]] = []
        for column in self.features:
            if column in self.vocabularies:
                vocabulary = self.vocabularies[column]
                index = {v: i for i, v in enumerate(vocabulary)}
                other = len(vocabulary)
                positions = np.array(
                    [
                        index.get(label_key(v), other) if pd.notna(v) else other
                        for v in frame[column]
                    ],
                    dtype=np.int64,
                )
                block = np.zeros((len(frame), other + 1), dtype=np.float32)
                block[np.arange(len(frame)), positions] = 1.0
                blocks.append(block)
            else:
                values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
                mean, std = self.means[column], self.stds[column]
                values = np.where(np.isfinite(values), values, mean)
                blocks.append(((values - mean) / std).astype(np.float32)[:, None])
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0), np.float32)

    def transform_labels(
        self, frame: pd.DataFrame
    ) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.bool_]]:
        """Labels as class indices (classification) or float targets, and which rows have a
        usable label (rows with a missing or unknown label are left out of training)."""
        import pandas as pd

        if self.label not in frame.columns:
            raise ValueError(f"the table lacks the label column {self.label!r}")
        if self.task == "classification":
            index = {c: i for i, c in enumerate(self.classes)}
            keys = frame[self.label].map(
                lambda v: index.get(label_key(v), -1) if pd.notna(v) else -1
            )
            labels = keys.to_numpy(np.int64)
            return labels, labels >= 0
        target = pd.to_numeric(frame[self.label], errors="coerce").to_numpy(np.float64)
        return target.astype(np.float32), np.isfinite(target)

    def transform(
        self, frame: pd.DataFrame
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.generic]]:
        """Rows with a usable label: (inputs, labels)."""
        features = self.transform_features(frame)
        labels, usable = self.transform_labels(frame)
        return features[usable], labels[usable]


def merge_summaries(summaries: Sequence[SiteSummary], table: TableConfig) -> Preprocessor:
    """The federation's preprocessor from bounded site summaries (order does not matter)."""
    means: dict[str, float] = {}
    stds: dict[str, float] = {}
    for column in table.numeric_features:
        parts = [s.numeric[column] for s in summaries if column in s.numeric]
        count = sum(p.count for p in parts)
        if count == 0 or table.numeric == "none":
            means[column], stds[column] = 0.0, 1.0
            continue
        mean = sum(p.sum for p in parts) / count
        variance = max(sum(p.sum_sq for p in parts) / count - mean**2, 0.0)
        means[column] = mean
        stds[column] = math.sqrt(variance) if variance > 1e-12 else 1.0
    vocabularies: dict[str, list[str]] = {}
    for column in table.categorical:
        total: Counter[str] = Counter()
        for summary in summaries:
            total.update(summary.categories.get(column, {}))
        kept = [
            v
            for v, n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
            if n >= table.min_category_count
        ][: table.max_categories]
        vocabularies[column] = sorted(kept)
    classes: list[str] = []
    if table.task == "classification":
        labels: Counter[str] = Counter()
        for summary in summaries:
            labels.update(summary.labels)
        classes = sorted(labels, key=_class_order)
        if len(classes) < 2:
            raise ValueError(
                f"label {table.label!r} has {len(classes)} class(es) across all sites; "
                "classification needs at least 2"
            )
    return Preprocessor(
        features=list(table.features),
        categorical=list(table.categorical),
        label=table.label,
        task=table.task,
        means=means,
        stds=stds,
        vocabularies=vocabularies,
        classes=classes,
        sites=len(summaries),
        rows=sum(s.rows for s in summaries),
    )


def _class_order(key: str) -> tuple[int, float, str]:
    """Numeric labels in numeric order (0, 1, 2, 10), then the rest alphabetically."""
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)
