"""What happened to each site in a round, as rows an operator reads in the Prefect UI.

Pure: the coordinator's round outcome in, one :class:`SiteRow` per site out (trained,
rejected, failed, late, left out by reputation, or excluded by its data contract), plus the
flattened table and the run's markdown summary. Everything a site reported (metric names,
reasons) is bounded here before it is shown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

STATUSES = ("trained", "rejected", "failed", "late", "left out", "excluded")
# A site's own metrics shown per row: the first few, names and values bounded.
MAX_SITE_METRICS = 8
MAX_NAME = 40
MAX_REASON = 300


class SiteRow(BaseModel):
    """One site in one round."""

    site: str
    status: str
    reason: str = ""
    examples: int = 0
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class SiteFigures:
    """What a site's round task returned (reported by the site, bounded by the caller)."""

    examples: int = 0
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _site_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    shown: dict[str, float] = {}
    # the site's own training figures first, then its evaluation of the last global model
    for name in sorted(metrics, key=lambda n: (not n.startswith("train_"), n)):
        if len(shown) == MAX_SITE_METRICS:
            break
        value = metrics[name]
        if isinstance(value, int | float) and math.isfinite(value):
            shown[_clip(str(name), MAX_NAME)] = float(value)
    return shown


def site_rows(
    *,
    selected: Sequence[str],
    accepted: Mapping[str, int],
    rejected: Mapping[str, str],
    failed: Mapping[str, str],
    late: Mapping[str, str],
    left_out: Mapping[str, str],
    excluded: Mapping[str, str],
    figures: Mapping[str, SiteFigures],
) -> list[SiteRow]:
    """Every site the round touched, in a stable order: selected sites first (as selected),
    then sites whose update counted although they were selected earlier, then those left
    out or excluded, then late updates of earlier rounds."""

    def row(site: str, status: str, reason: str = "") -> SiteRow:
        got = figures.get(site, SiteFigures())
        return SiteRow(
            site=site,
            status=status,
            reason=_clip(reason, MAX_REASON),
            examples=accepted.get(site, got.examples) if status == "trained" else got.examples,
            seconds=max(0.0, got.seconds) if math.isfinite(got.seconds) else 0.0,
            bytes_up=max(0, got.bytes_up),
            bytes_down=max(0, got.bytes_down),
            metrics=_site_metrics(got.metrics),
        )

    rows: list[SiteRow] = []
    # An update may come from a site selected earlier (an asynchronous version folds in
    # updates trained on older versions): those sites follow the selected ones.
    named = [*accepted, *rejected, *failed]
    for site in [*selected, *(s for s in dict.fromkeys(named) if s not in set(selected))]:
        if site in accepted:
            rows.append(row(site, "trained"))
        elif site in rejected:
            rows.append(row(site, "rejected", rejected[site]))
        elif site in failed:
            rows.append(row(site, "failed", failed[site]))
        else:
            rows.append(row(site, "failed", "no update and no reason reported"))
    seen = {r.site for r in rows}
    for site, why in sorted(left_out.items()):
        if site not in seen:
            rows.append(row(site, "left out", why))
            seen.add(site)
    for site, why in sorted(excluded.items()):
        if site not in seen:
            rows.append(row(site, "excluded", why))
            seen.add(site)
    rows += [
        SiteRow(site=which, status="late", reason=_clip(why, MAX_REASON))
        for which, why in sorted(late.items())
    ]
    return rows


def table(rows: Sequence[SiteRow]) -> list[dict[str, str | int | float]]:
    """Rows flattened for a Prefect table artifact: one column per figure and site metric."""
    names = sorted({name for r in rows for name in r.metrics})
    flat: list[dict[str, str | int | float]] = []
    for r in rows:
        line: dict[str, str | int | float] = {
            "site": r.site,
            "status": r.status,
            "reason": r.reason,
            "examples": r.examples,
            "seconds": round(r.seconds, 3),
            "bytes up": r.bytes_up,
            "bytes down": r.bytes_down,
        }
        for name in names:
            value = r.metrics.get(name)
            line[name] = round(value, 4) if value is not None else ""
        flat.append(line)
    return flat


def status_counts(rows: Sequence[SiteRow]) -> dict[str, int]:
    """How many sites ended the round in each status (statuses with none left out)."""
    counts = {status: 0 for status in STATUSES}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {status: n for status, n in counts.items() if n}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass(frozen=True)
class RunOverview:
    """What the run summary says: set by the coordinator at the end of a run."""

    federation: str
    tenant: str
    run_id: str
    config_revision: str
    strategy: str
    mode: str
    rounds: int
    metric: str
    final_metrics: Mapping[str, float]
    participating: Sequence[str]
    excluded: Mapping[str, str]
    history: Sequence[tuple[int, float]]
    bytes_up: float
    bytes_down: float
    model: str | None = None
    mlflow_url: str | None = None
    round_median_seconds: float = 0.0


def summary_markdown(run: RunOverview) -> str:
    """The run's markdown summary for the Prefect UI."""
    lines = [
        f"# {_cell(run.federation)} · run {_cell(run.run_id)}",
        "",
        "| | |",
        "|---|---|",
        f"| tenant | {_cell(run.tenant)} |",
        f"| config revision | `{_cell(run.config_revision)}` |",
        f"| strategy | {_cell(run.strategy)} ({run.mode}) |",
        f"| rounds | {run.rounds} (median {run.round_median_seconds:.2f} s) |",
        f"| sites | {len(run.participating)} took part, {len(run.excluded)} excluded |",
        f"| traffic | {_human_bytes(run.bytes_up)} up, {_human_bytes(run.bytes_down)} down |",
    ]
    if run.model:
        model = _cell(run.model)
        lines.append(
            f"| registered | [{model}]({run.mlflow_url}) |"
            if run.mlflow_url
            else f"| registered | {model} |"
        )
    elif run.mlflow_url:
        lines.append(f"| MLflow run | [{run.mlflow_url}]({run.mlflow_url}) |")
    lines += ["", "## Final metrics", ""]
    if run.final_metrics:
        lines += ["| metric | value |", "|---|---|"]
        order = sorted(run.final_metrics, key=lambda name: (name != run.metric, name))
        lines += [f"| {_cell(name)} | {run.final_metrics[name]:.4f} |" for name in order]
    else:
        lines.append("No central held-out set: see the per-site metrics in MLflow.")
    if run.history:
        lines += ["", f"## {_cell(run.metric)} per round", "", "| round | value |", "|---|---|"]
        lines += [f"| {r} | {v:.4f} |" for r, v in run.history]
    if run.excluded:
        lines += ["", "## Excluded sites", "", "| site | reason |", "|---|---|"]
        lines += [f"| {_cell(s)} | {_cell(why)} |" for s, why in sorted(run.excluded.items())]
    return "\n".join(lines) + "\n"
