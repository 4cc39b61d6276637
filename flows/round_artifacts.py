"""Rounds that explain themselves in the Prefect UI: a table artifact per round (every site's
status, reason, examples, seconds, bytes and local metrics) and, per run, a markdown summary
with a chart of the global and per-site metric per round.

The rows and the markdown are built by the pure ``tasks.core.round_table``; this module only
hands them to Prefect. An artifact that cannot be written is logged and skipped: it never
fails a round.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Mapping, Sequence

from fedround.flows.services.local_ui import MLFLOW_UI_ENV
from fedround.tasks.core.round_table import (
    RunOverview,
    SiteRow,
    status_counts,
    summary_markdown,
    table,
)

log = logging.getLogger(__name__)

# The site metric drawn beside a global metric (the site's own training figure).
SITE_METRIC = {"accuracy": "train_accuracy", "loss": "train_loss"}


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def mlflow_ui_url(tracking_uri: str) -> str | None:
    """The MLflow UI's base URL (the embedded local one, or the tracking server itself when
    it speaks HTTP), or ``None`` when no UI serves this tracking store."""
    url = os.environ.get(MLFLOW_UI_ENV) or (
        tracking_uri if tracking_uri.startswith(("http://", "https://")) else None
    )
    return url.rstrip("/") if url else None


def model_url(ui: str | None, name: str, version: str) -> str | None:
    return f"{ui}/#/models/{name}/versions/{version}" if ui else None


def publish_round_table(federation: str, run_id: str, round_: int, rows: Sequence[SiteRow]) -> None:
    """The round's table artifact on the current flow run."""
    from prefect.artifacts import create_table_artifact

    counts = ", ".join(f"{n} {status}" for status, n in status_counts(rows).items())
    try:
        create_table_artifact(
            table=table(rows),
            description=f"{federation} run {run_id} · round {round_}: {counts or 'no sites'}",
        )
    except Exception:
        log.warning("could not write round %d's table artifact", round_, exc_info=True)


def chart_points(
    metric: str, history: Sequence[Mapping[str, object]]
) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]], str | None]:
    """Global ``metric`` and each site's matching metric per round, from round records
    (``{"round", "metrics", "sites"}`` as RoundSummary dumps them)."""
    site_metric = SITE_METRIC.get(metric, metric)
    global_points: list[tuple[int, float]] = []
    site_points: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        round_ = int(record["round"])  # type: ignore[call-overload]
        value = record.get("metrics", {}).get(metric)  # type: ignore[attr-defined]
        if isinstance(value, int | float):
            global_points.append((round_, float(value)))
        for row in record.get("sites", []):  # type: ignore[attr-defined]
            local = row.get("metrics", {}).get(site_metric) if isinstance(row, dict) else None
            if row.get("status") == "trained" and isinstance(local, int | float):
                site_points.setdefault(str(row["site"]), []).append((round_, float(local)))
    return global_points, site_points, site_metric if site_points else None


def publish_run_summary(run: RunOverview, history: Sequence[Mapping[str, object]]) -> None:
    """The run's markdown summary with its chart, keyed per federation (the Artifacts page
    then lists every run's summary of one federation as versions of one artifact)."""
    from prefect.artifacts import create_markdown_artifact

    from fedround.tasks.plots import metric_chart

    markdown = summary_markdown(run)
    try:
        global_points, site_points, site_metric = chart_points(run.metric, history)
        png = metric_chart(run.metric, global_points, site_points, site_metric)
        if png is not None:
            encoded = base64.b64encode(png).decode()
            markdown += (
                f"\n## Chart\n\n![{run.metric} per round](data:image/png;base64,{encoded})\n"
            )
        create_markdown_artifact(
            markdown=markdown,
            key=artifact_key(run.federation, "run-summary"),
            description=f"{run.federation} run {run.run_id}: summary",
        )
    except Exception:
        log.warning("could not write the run's summary artifact", exc_info=True)
