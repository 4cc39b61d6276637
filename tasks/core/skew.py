"""Label skew: how far each site's label histogram is from the federation's.

Computed from counts only, the per-class label counts every site sends with its data
contract (tables: the set-up summary's ``labels``; arrays: the profile's ``label``
column), never from rows. For site s with counts Oₖ (nₛ = Σₖ Oₖ) and the federation's
pooled proportions pₖ = Nₖ / N (all passing sites together, s included):

- ``chi2`` = Σₖ (Oₖ − nₛ·pₖ)² / (nₛ·pₖ), Pearson's goodness-of-fit statistic of the site's
  histogram against the federation's, over the classes the federation has (``dof`` =
  their number − 1). It grows with the site's size: compare sites by ``tv_distance``.
- ``tv_distance`` = ½ Σₖ |Oₖ/nₛ − pₖ|, the total variation distance in [0, 1]: 0 for a
  site that looks like the federation, 1 − pₖ for a site holding only class k.
- ``missing_classes``: classes the federation has and the site does not.

A site's counts are bounded by the rows its data contract checked (scaled down when they
add up to more), so a site cannot distort the federation's histogram by over-reporting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from .contract_report import ContractReport


class SiteLabelSkew(BaseModel):
    """One site's label histogram against the federation's."""

    model_config = ConfigDict(frozen=True)

    examples: float
    classes: int  # classes the site holds
    chi2: float
    dof: int
    tv_distance: float
    missing_classes: list[str]


def bounded_counts(counts: Mapping[str, float], max_rows: int | None) -> dict[str, float]:
    """Non-negative, finite counts adding up to at most ``max_rows`` (scaled down)."""
    clean = {
        str(k): float(v) for k, v in counts.items() if math.isfinite(float(v)) and float(v) > 0
    }
    total = sum(clean.values())
    if max_rows is not None and total > max_rows:
        scale = max(max_rows, 0) / total
        clean = {k: v * scale for k, v in clean.items()}
    return clean


def label_counts(report: ContractReport) -> dict[str, float] | None:
    """The per-class label counts a site sent with its contract report (bounded by the rows
    it checked), or ``None`` when it sent none (regression, or an older site)."""
    raw: Mapping[str, float] | None = None
    if report.data_summary is not None and report.data_summary.labels:
        raw = report.data_summary.labels
    elif report.label_counts:
        raw = report.label_counts
    if not raw:
        return None
    return bounded_counts(raw, report.row_count)


def label_skew(histograms: Mapping[str, Mapping[str, float]]) -> dict[str, SiteLabelSkew]:
    """Each site's skew against the pooled histogram of all of them (sites with no counts
    are left out)."""
    sites = {site: counts for site, counts in histograms.items() if sum(counts.values()) > 0}
    pooled: dict[str, float] = {}
    for counts in sites.values():
        for label, count in counts.items():
            pooled[label] = pooled.get(label, 0.0) + count
    total = sum(pooled.values())
    classes = sorted(label for label, count in pooled.items() if count > 0)
    result: dict[str, SiteLabelSkew] = {}
    for site in sorted(sites):
        counts = sites[site]
        n = sum(counts.values())
        chi2 = 0.0
        tv = 0.0
        for label in classes:
            p = pooled[label] / total
            observed = counts.get(label, 0.0)
            expected = n * p
            chi2 += (observed - expected) ** 2 / expected
            tv += abs(observed / n - p)
        result[site] = SiteLabelSkew(
            examples=n,
            classes=sum(1 for label in classes if counts.get(label, 0.0) > 0),
            chi2=chi2,
            dof=max(len(classes) - 1, 0),
            tv_distance=tv / 2,
            missing_classes=[label for label in classes if counts.get(label, 0.0) <= 0],
        )
    return result


def label_skew_report(reports: Mapping[str, ContractReport]) -> dict[str, Any]:
    """The run's label-skew report (JSON-ready): per site, and the federation's histogram.

    ``{"sites": {site: {...}}, "federation": {label: count}, "max_tv_distance": x}``;
    empty when no site sent label counts.
    """
    histograms = {
        site: counts
        for site, report in reports.items()
        if (counts := label_counts(report)) is not None
    }
    skew = label_skew(histograms)
    if not skew:
        return {}
    federation: dict[str, float] = {}
    for counts in histograms.values():
        for label, count in counts.items():
            federation[label] = federation.get(label, 0.0) + count
    return {
        "sites": {site: entry.model_dump() for site, entry in skew.items()},
        "federation": dict(sorted(federation.items())),
        "max_tv_distance": max(entry.tv_distance for entry in skew.values()),
    }
