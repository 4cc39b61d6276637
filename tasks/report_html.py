"""``fedround report`` as one self-contained HTML page: a run, or a tenant's dashboard.

Pure: the models of :mod:`fedround.tasks.report_data` in, an HTML string out, readable
from a file with no server and nothing to fetch (inline CSS; plots are inline SVG drawn with
matplotlib's object API, no pyplot; the participation grid is hand-written SVG whose cells
carry ``<title>`` tooltips). Every string a site could have written (site names, reasons,
metric names, contract summaries, audit reasons) goes through :func:`html.escape`;
matplotlib escapes the text it writes into its SVG, and labels it draws are kept out of
its mathtext parser.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from fedround.tasks.report_data import (
    STATUSES,
    AuditRow,
    RunReport,
    Series,
    SiteRound,
    TenantReport,
    VersionInfo,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Participation colours: done (green), refused or broken (reds, oranges), kept out (purple,
# slate), not asked (light grey), unknown (white with a border).
STATUS_COLORS = {
    "trained": "#2e7d32",
    "rejected": "#c62828",
    "failed": "#ef6c00",
    "late": "#f9a825",
    "left out": "#6a1b9a",
    "excluded": "#455a64",
    "not selected": "#e0e0e0",
    "no record": "#ffffff",
}
OTHER_COLOR = "#9e9e9e"
STATUS_MEANING = {
    "trained": "its update was accepted into the round's model",
    "rejected": "its update failed validation (signature, shape, norm, size, ...)",
    "failed": "it did not deliver an update (error, timeout, site down)",
    "late": "its update arrived after the round had closed, and was rejected",
    "left out": "left out by its reputation (too many strikes)",
    "excluded": "its data failed the federation's data contract",
    "not selected": "not sampled for this round",
    "no record": "no per-round record: the run has no lineage/rounds.json",
}
MAX_SITE_CHARTS = 8
MAX_LEGEND = 12
MAX_LABEL = 32

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
  color: var(--fg); background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 6px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 8px; }
.sub, .muted, caption { color: var(--muted); }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12.5px; }
nav.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
  padding: 10px 18px; margin: 18px 0; }
nav.toc ol { margin: 4px 0; padding-left: 20px; columns: 2; }
nav.toc a, a { color: var(--accent); text-decoration: none; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 190px; }
tr.ours td { background: #fff8c5; }
caption { caption-side: bottom; text-align: left; font-size: 12px; padding-top: 4px; }
.note { background: #fff8c5; border: 1px solid #d4a72c66; border-radius: 6px; padding: 8px 12px;
  margin: 10px 0; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600; color: #fff; background: var(--muted); }
.badge.FINISHED { background: #1a7f37; } .badge.FAILED { background: #cf222e; }
.badge.RUNNING { background: #0969da; } .badge.KILLED { background: #8250df; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 8px 18px; }
.chart svg { width: 100%; height: auto; display: block; }
.heatmap { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
.heatmap svg { display: block; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin: 8px 0; font-size: 13px; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #8c959f;
  vertical-align: -1px; margin-right: 5px; }
details summary { cursor: pointer; color: var(--accent); }
ul.settings { margin: 0; padding-left: 18px; }
footer { margin-top: 48px; color: var(--muted); font-size: 12px; }
"""


# --- small helpers ----------------------------------------------------------------------


def e(value: object) -> str:
    """Escaped for HTML text and quoted attributes."""
    return html.escape(str(value), quote=True)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _metric(value: float | None) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def _short(text: str, limit: int = MAX_LABEL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _label(text: str, limit: int = MAX_LABEL) -> str:
    """Text for matplotlib: no mathtext (``$``), not hidden from legends (a leading ``_``)."""
    text = _short(text, limit).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def ranges(numbers: Iterable[int]) -> str:
    """``[1, 2, 3, 5, 7, 8]`` → ``"1–3, 5, 7–8"``."""
    ordered = sorted(set(numbers))
    parts: list[str] = []
    start = prev = None
    for n in [*ordered, None]:
        if start is not None and (n is None or prev is None or n != prev + 1):
            parts.append(str(start) if start == prev else f"{start}–{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ", ".join(parts)


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Iterable[int] = (),
    row_class: Callable[[int], str] | None = None,
    caption: str = "",
) -> str:
    """A table; ``rows`` hold cells that are already HTML (escape them first)."""
    right = set(numeric)
    head = "".join(
        f'<th class="num">{e(h)}</th>' if i in right else f"<th>{e(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = []
    for n, row in enumerate(rows):
        cls = row_class(n) if row_class else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if i in right else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        body.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table; values are HTML already."""
    body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _settings_list(settings: Mapping[str, str]) -> str:
    items = "".join(f"<li><code>{e(k)}</code>: {e(v)}</li>" for k, v in settings.items())
    return f'<ul class="settings">{items}</ul>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{e(title)}</h2>\n{body}\n</section>'


def _page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]], notes: str) -> str:
    """The whole document: title, table of contents, sections (anchor, title, body)."""
    toc = "".join(f'<li><a href="#{anchor}">{e(name)}</a></li>' for anchor, name, _ in sections)
    body = "\n".join(_section(anchor, name, content) for anchor, name, content in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<header><h1>{e(title)}</h1><p class="sub">{subtitle}</p></header>\n'
        f'<nav class="toc"><strong>Contents</strong><ol>{toc}</ol></nav>\n{notes}'
        f"{body}\n"
        "<footer>Written by <code>fedround report</code>: one self-contained file; "
        "nothing in it is fetched from a server.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )


# --- charts (matplotlib, inline SVG) ------------------------------------------------------


class _Charts:
    """Draws figures as inline SVG; each gets its own id salt, so ids in one page differ."""

    def __init__(self) -> None:
        self.count = 0

    def svg(self, figure: Figure, description: str) -> str:
        from matplotlib import rc_context

        self.count += 1
        buffer = io.StringIO()
        with rc_context({"svg.fonttype": "none", "svg.hashsalt": f"fedround-{self.count}"}):
            figure.savefig(buffer, format="svg", metadata={"Date": None})
        text = buffer.getvalue()
        text = text[text.index("<svg") :]  # no XML prolog or DOCTYPE inside HTML
        text = text.replace("<svg ", f'<svg role="img" aria-label="{e(description)}" ', 1)
        return f'<div class="chart">{text}</div>'


def _figure(width: float = 7.0, height: float = 3.3) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _line_chart(
    charts: _Charts,
    title: str,
    lines: Mapping[str, Series],
    emphasis: Mapping[str, str] | None = None,
) -> str | None:
    """One chart of per-round lines; ``emphasis`` maps a line to ``"bold"`` or ``"dashed"``."""
    from matplotlib.ticker import MaxNLocator

    drawn = {name: sorted(points) for name, points in lines.items() if points}
    if not drawn:
        return None
    figure = _figure()
    axes = figure.subplots()
    style = emphasis or {}
    for name, points in drawn.items():
        xs, ys = zip(*points, strict=True)
        kind = style.get(name)
        if kind == "bold":
            axes.plot(xs, ys, lw=2.4, color="black", marker="o", ms=3, label=_label(name))
        elif kind == "dashed":
            axes.plot(xs, ys, lw=1.8, ls="--", color="#0969da", marker=".", label=_label(name))
        else:
            axes.plot(xs, ys, lw=1.1, alpha=0.8, marker=".", label=_label(name))
    axes.set_title(_label(title, 120), fontsize=11)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if len(drawn) <= MAX_LEGEND:
        axes.legend(fontsize="small", ncol=2 if len(drawn) > 4 else 1)
    return charts.svg(figure, title)


def _bar_chart(charts: _Charts, report: RunReport) -> str | None:
    totals = [t for t in report.site_totals if t.seconds_total or t.bytes_up or t.bytes_down]
    if not totals:
        return None
    names = [_label(t.site) for t in totals]
    figure = _figure(10.0, max(2.4, 0.32 * len(totals) + 1.2))
    left, right = figure.subplots(1, 2, sharey=True)
    positions = list(range(len(totals)))
    left.barh(positions, [t.seconds_total for t in totals], color="#2e7d32")
    left.set_yticks(positions, names)
    left.invert_yaxis()
    left.set_xlabel("seconds, all rounds")
    left.set_title("Time at each site", fontsize=11)
    height = 0.4
    right.barh(
        [p - height / 2 for p in positions],
        [t.bytes_up / 1024 for t in totals],
        height,
        label="up (updates)",
        color="#0969da",
    )
    right.barh(
        [p + height / 2 for p in positions],
        [t.bytes_down / 1024 for t in totals],
        height,
        label="down (global models)",
        color="#8c959f",
    )
    right.set_xlabel("KiB, all rounds")
    right.set_title("Traffic per site", fontsize=11)
    figure.legend(fontsize="small", loc="outside lower right", ncol=2)
    for axes in (left, right):
        axes.grid(alpha=0.3, axis="x")
    return charts.svg(figure, "time and bytes per site")


def _tenant_chart(charts: _Charts, report: TenantReport) -> str | None:
    metrics = [run.metric for run in report.runs if run.final_value is not None]
    if not metrics:
        return None
    metric = max(set(metrics), key=metrics.count)  # the metric most runs lead with
    by_federation: dict[str, list[tuple[datetime, float]]] = {}
    for run in report.runs:
        if run.metric == metric and run.final_value is not None and run.started_at:
            by_federation.setdefault(run.federation, []).append((run.started_at, run.final_value))
    if not by_federation:
        return None
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num

    figure = _figure(10.0, 3.6)
    axes = figure.subplots()
    for federation, points in sorted(by_federation.items()):
        points.sort()
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, marker="o", lw=1.2, label=_label(federation))
    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    moments = [moment for points in by_federation.values() for moment, _ in points]
    if max(moments) - min(moments) < timedelta(hours=1):  # one run: a day around it
        day = (min(moments) - timedelta(hours=12), max(moments) + timedelta(hours=12))
        axes.set_xlim(float(date2num(day[0])), float(date2num(day[1])))
    axes.set_ylabel(_label(f"final {metric}"))
    axes.set_title(_label(f"Final {metric} of each run, by start time (UTC)", 120), fontsize=11)
    axes.grid(alpha=0.3)
    if len(by_federation) <= MAX_LEGEND:
        axes.legend(fontsize="small")
    return charts.svg(figure, f"final {metric} per run over time")


# --- participation (hand-written SVG) -----------------------------------------------------


def participation_svg(
    rows: Sequence[SiteRound], sites: Sequence[str], rounds: Sequence[int]
) -> str:
    """Site × round grid, one ``<rect>`` per cell coloured by status, with a ``<title>``
    tooltip (site, round, status, reason) and ``data-*`` attributes."""
    if not sites or not rounds:
        return '<p class="muted">No rounds recorded.</p>'
    column = {r: i for i, r in enumerate(rounds)}
    line = {s: i for i, s in enumerate(sites)}
    cell_w = max(4.0, min(44.0, 900.0 / len(rounds)))
    cell_h = 22.0 if len(sites) <= 30 else 18.0 if len(sites) <= 60 else 10.0
    label_w = 14 + 7 * min(MAX_LABEL, max(len(s) for s in sites))
    top = 26.0
    width = label_w + cell_w * len(rounds) + 8
    height = top + cell_h * len(sites) + 6
    every = max(1, math.ceil(26 / cell_w))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        'aria-label="participation per site and round" font-family="sans-serif" font-size="11">'
    ]
    for r, i in column.items():
        if i % every == 0 or i == len(rounds) - 1:
            x = label_w + cell_w * (i + 0.5)
            parts.append(f'<text x="{x:.1f}" y="{top - 8:.0f}" text-anchor="middle">{r}</text>')
    for s, j in line.items():
        y = top + cell_h * (j + 0.5) + 4
        parts.append(
            f'<text x="{label_w - 6}" y="{y:.1f}" text-anchor="end"><title>{e(s)}</title>'
            f"{e(_short(s))}</text>"
        )
    for row in rows:
        if row.site not in line or row.round not in column:
            continue
        x = label_w + cell_w * column[row.round]
        y = top + cell_h * line[row.site]
        color = STATUS_COLORS.get(row.status, OTHER_COLOR)
        tip = f"{row.site} · round {row.round}: {row.status}"
        if row.reason:
            tip += f" — {row.reason}"
        elif row.status == "trained":
            tip += f" ({row.examples} examples, {row.seconds:.2f} s)"
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(cell_w - 1, 1):.1f}" '
            f'height="{cell_h - 1:.1f}" fill="{color}" stroke="#d0d7de" stroke-width="0.5" '
            f'class="cell" data-site="{e(row.site)}" data-round="{row.round}" '
            f'data-status="{e(row.status)}"><title>{e(tip)}</title></rect>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _legend(rows: Sequence[SiteRound]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    shown = [s for s in STATUSES if s in counts] + sorted(set(counts) - set(STATUSES))
    items = "".join(
        f'<span title="{e(STATUS_MEANING.get(s, s))}"><span class="swatch" '
        f'style="background:{STATUS_COLORS.get(s, OTHER_COLOR)}"></span>{e(s)} '
        f'<span class="muted">({counts[s]})</span></span>'
        for s in shown
    )
    return f'<div class="legend">{items}</div>'


def _reasons_table(rows: Sequence[SiteRound], sites: Sequence[str]) -> str:
    """Why sites were left out: one line per (site, status, reason) with its rounds."""
    grouped: dict[tuple[str, str, str], list[int]] = {}
    for row in rows:
        if row.reason and row.status != "trained":
            grouped.setdefault((row.site, row.status, row.reason), []).append(row.round)
    if not grouped:
        return '<p class="muted">No site was excluded, rejected, failed or left out.</p>'
    order = {s: i for i, s in enumerate(sites)}
    lines = sorted(grouped.items(), key=lambda kv: (order.get(kv[0][0], len(order)), min(kv[1])))
    return _table(
        ["site", "status", "rounds", "reason"],
        [
            [
                e(site),
                f'<span class="swatch" style="background:{STATUS_COLORS.get(status, OTHER_COLOR)}">'
                f"</span>{e(status)}",
                e(ranges(rounds)),
                e(reason),
            ]
            for (site, status, reason), rounds in lines
        ],
    )


# --- the run report ---------------------------------------------------------------------


def _header(report: RunReport) -> str:
    config = report.config
    completed = len(report.rounds)
    planned = f" of {report.rounds_planned} planned" if report.rounds_planned else ""
    duration = ""
    if report.started_at and report.finished_at:
        duration = f" ({_duration((report.finished_at - report.started_at).total_seconds())})"
    lead = report.lead_metric
    finals = sorted(report.final_metrics, key=lambda k: (k != lead, k.startswith("federated_"), k))
    final = ", ".join(
        f"<code>{e(k)}</code> {_metric(report.final_metrics[k])}"
        for k in finals
        if k not in ("federated_examples", "federated_sites")
    )
    extra = [
        (label, f"<code>{e(config[key])}</code>")
        for key, label in (
            ("config_tracked_by", "Config tracked by"),
            ("config_git_commit", "Config git commit"),
            ("config_dvc_md5", "Config DVC md5"),
            ("contract_sha256", "Contract sha256"),
            ("config_dirty_reasons", "Dirty because"),
            ("parent_model", "Fine-tuned from"),
            ("parent_version", "Parent version"),
            ("prefect_flow_run_id", "Prefect flow run"),
        )
        if config.get(key)
    ]
    rows = [
        ("Federation", e(report.federation)),
        ("Tenant", e(report.tenant)),
        ("Run id", f"<code>{e(report.run_id)}</code>"),
        ("Status", f'<span class="badge {e(report.status)}">{e(report.status)}</span>'),
        ("Started", e(_when(report.started_at))),
        ("Finished", e(_when(report.finished_at)) + e(duration)),
        ("Rounds", f"{completed} recorded{e(planned)} ({e(report.mode)})"),
        ("Config revision", f"<code>{e(config.get('config_revision', 'not recorded'))}</code>"),
        ("Config sha256", f"<code>{e(config.get('config_sha256', 'not recorded'))}</code>"),
        *extra,
        (
            "Strategy",
            f"<strong>{e(report.strategy.get('name', '?'))}</strong>"
            + _settings_list({k: v for k, v in report.strategy.items() if k != "name"}),
        ),
        (
            "Privacy",
            _settings_list(report.privacy) if report.privacy else "not configured",
        ),
        (
            "MLflow run",
            f"<code>{e(report.mlflow_run_id)}</code> in experiment <code>{e(report.experiment)}"
            f"</code> at <code>{e(report.tracking)}</code>",
        ),
        ("Final metrics", final or "none (no central held-out set)"),
        ("Sites", f"{len(report.sites)} listed: " + e(", ".join(report.sites))),
    ]
    return _kv(rows)


def _metrics_section(charts: _Charts, report: RunReport) -> str:
    lead = report.lead_metric
    central = [n for n in report.global_metrics if not n.startswith("federated_")]
    federated_only = [
        n.removeprefix("federated_")
        for n in report.global_metrics
        if n.startswith("federated_") and n.removeprefix("federated_") not in central
    ]
    names = sorted([*central, *federated_only], key=lambda n: (n != lead, n != "loss", n))
    out = ["<h3>Global model</h3>"]
    if not names:
        out.append(
            '<p class="muted">No global metric per round: the federation has no central '
            "held-out set and no federated evaluation.</p>"
        )
    blocks = []
    for name in names:
        lines = {}
        style = {}
        if name in report.global_metrics:
            lines[f"{name} (held-out)"] = report.global_metrics[name]
            style[f"{name} (held-out)"] = "bold"
        federated = report.global_metrics.get(f"federated_{name}")
        if federated:
            lines[f"federated {name} (sites)"] = federated
            style[f"federated {name} (sites)"] = "dashed"
        chart = _line_chart(charts, f"{name} per round", lines, style)
        if chart:
            blocks.append(chart)
    if blocks:
        out.append(f'<div class="charts">{"".join(blocks)}</div>')
        out.append(
            '<p class="muted">Bold: the central evaluation on the coordinator\'s held-out set '
            "after each round. Dashed: federated evaluation at the sites (round r's sites score "
            "round r − 1's model, logged at step r − 1).</p>"
        )
        out.append(
            _metrics_table(report, sorted(report.global_metrics, key=lambda n: (n != lead, n)))
        )
    out.append("<h3>Per site</h3>")
    site_names = sorted(report.site_metrics, key=lambda n: (not n.startswith("train_"), n))
    site_blocks = []
    for name in site_names[:MAX_SITE_CHARTS]:
        chart = _line_chart(charts, f"{name} at each site", report.site_metrics[name])
        if chart:
            site_blocks.append(chart)
    if site_blocks:
        out.append(f'<div class="charts">{"".join(site_blocks)}</div>')
        if len(site_names) > MAX_SITE_CHARTS:
            rest = ", ".join(f"<code>{e(n)}</code>" for n in site_names[MAX_SITE_CHARTS:])
            out.append(f'<p class="muted">Also recorded per site (see MLflow): {rest}</p>')
    else:
        out.append('<p class="muted">No per-site metric was recorded.</p>')
    return "\n".join(out)


def _metrics_table(report: RunReport, names: Sequence[str]) -> str:
    steps = sorted({step for n in names for step, _ in report.global_metrics[n]})
    values = {n: dict(report.global_metrics[n]) for n in names}
    table = _table(
        ["round", *names],
        [[str(step), *(_metric(values[n].get(step)) for n in names)] for step in steps],
        numeric=range(len(names) + 1),
    )
    return f"<details><summary>Values per round</summary>{table}</details>"


def _participation_section(report: RunReport) -> str:
    out = []
    if not report.round_detail:
        out.append(
            '<p class="note">Per-round detail is missing: the run has no lineage/rounds.json '
            "(it crashed, or is still running). The grid is rebuilt from the per-site metrics; "
            "<em>no record</em> means the site logged nothing in that round, for a reason "
            "that was not recorded.</p>"
        )
    out.append(_legend(report.participation))
    grid = participation_svg(report.participation, report.sites, report.rounds)
    out.append(f'<div class="heatmap">{grid}</div>')
    out.append('<p class="muted">Hover a cell for the site, round, status and reason.</p>')
    out.append("<h3>Why sites were left out</h3>")
    out.append(_reasons_table(report.participation, report.sites))
    return "\n".join(out)


def _sites_section(charts: _Charts, report: RunReport) -> str:
    chart = _bar_chart(charts, report) or '<p class="muted">No time or traffic recorded.</p>'
    rows = [
        [
            e(t.site),
            str(t.rounds_trained),
            f"{t.examples:,}",
            f"{t.seconds_total:.2f}",
            f"{t.seconds_median:.3f}",
            f'<span title="{t.bytes_up:,} bytes">{e(_bytes(t.bytes_up))}</span>',
            f'<span title="{t.bytes_down:,} bytes">{e(_bytes(t.bytes_down))}</span>',
        ]
        for t in report.site_totals
    ]
    table = _table(
        [
            "site",
            "rounds trained",
            "examples",
            "seconds (total)",
            "seconds (median round)",
            "bytes up",
            "bytes down",
        ],
        rows,
        numeric=range(1, 7),
        caption="Seconds: a site's whole round task (fetch, train, upload). Bytes up: its "
        "updates; down: the global models it fetched.",
    )
    return chart + table


def _contracts_section(report: RunReport) -> str:
    if report.contracts is None:
        return (
            '<p class="muted">Not recorded: the run has no lineage/contracts.json (it stopped '
            "before the sites checked their data).</p>"
        )
    if not report.contracts:
        return '<p class="muted">No site reported a contract result.</p>'
    return _table(
        ["site", "result", "suite", "rows", "rules", "summary"],
        [
            [
                e(c.site),
                '<strong style="color:#1a7f37">pass</strong>'
                if c.success
                else '<strong style="color:#cf222e">FAIL</strong>',
                e(c.suite or "—"),
                e(f"{c.rows:,}" if c.rows is not None else "—"),
                e(c.rules if c.rules is not None else "—"),
                e(c.summary),
            ]
            for c in report.contracts
        ],
        numeric=(3, 4),
    )


def _versions_table(versions: Sequence[VersionInfo]) -> str:
    return _table(
        ["model", "version", "semver", "aliases now", "status", "registered"],
        [
            [
                f"<code>{e(v.name)}</code>",
                e(v.version),
                e(v.semver or "—"),
                e(", ".join(v.aliases) or "none"),
                e(v.status or "—"),
                e(_when(v.registered_at)),
            ]
            for v in versions
        ],
    )


def _audit_table(rows: Sequence[AuditRow]) -> str:
    return _table(
        ["#", "when", "action", "model", "version", "previous production", "by", "reason"],
        [
            [
                str(a.sequence),
                e(_when(a.at)),
                f"<strong>{e(a.action)}</strong>",
                f"<code>{e(a.model)}</code>",
                e(a.version or "—"),
                e(a.previous_production or "—"),
                e(a.actor),
                e(a.reason),
            ]
            for a in rows
        ],
        numeric=(0,),
        row_class=lambda n: "ours" if rows[n].this_run else "",
        caption="Highlighted: entries about a version this run produced.",
    )


def _lineage_section(report: RunReport) -> str:
    out = ["<h3>Registered versions</h3>"]
    if report.versions:
        out.append(_versions_table(report.versions))
    else:
        out.append(
            '<p class="muted">This run registered no model version (it did not finish, or '
            "registration failed).</p>"
        )
    out.append("<h3>Promotion history (audit log)</h3>")
    if report.audit:
        out.append(_audit_table(report.audit))
    elif report.versions:
        out.append(
            '<p class="muted">No lifecycle action recorded for this model yet (promote it '
            "with <code>fedround promote &lt;config&gt;</code>).</p>"
        )
    else:
        out.append('<p class="muted">No registered model: nothing to audit.</p>')
    return "\n".join(out)


def _cost_section(report: RunReport) -> str:
    cost = report.cost
    if cost is None:
        return (
            '<p class="muted">Not recorded: the run has no cost/cost.json (it did not finish).</p>'
        )
    lines = [*cost.sites, cost.total]
    table = _table(
        ["owner", "compute seconds", "bytes up", "bytes down", "rounds"],
        [
            [
                f"<strong>{e(c.owner)}</strong>" if c is cost.total else e(c.owner),
                f"{c.compute_seconds:.2f}",
                f'<span title="{c.bytes_up:,.0f} bytes">{e(_bytes(c.bytes_up))}</span>',
                f'<span title="{c.bytes_down:,.0f} bytes">{e(_bytes(c.bytes_down))}</span>',
                str(c.rounds),
            ]
            for c in lines
        ],
        numeric=range(1, 5),
        caption=e(
            f"Tenant {cost.tenant}; coordinator {cost.coordinator_seconds:.1f} s. {cost.note}"
        ),
    )
    return table


def _notes(notes: Sequence[str]) -> str:
    return "".join(f'<p class="note">{e(n)}</p>' for n in notes)


def render_run(report: RunReport) -> str:
    """The report of one training run, as a complete HTML document."""
    charts = _Charts()
    sections = [
        ("run", "Run", _header(report)),
        ("metrics", "Metrics per round", _metrics_section(charts, report)),
        ("participation", "Participation", _participation_section(report)),
        ("sites", "Time and bytes per site", _sites_section(charts, report)),
        ("contracts", "Data contracts", _contracts_section(report)),
        ("lineage", "Lineage and promotion history", _lineage_section(report)),
        ("cost", "Cost", _cost_section(report)),
    ]
    subtitle = (
        f"Tenant {e(report.tenant)} · {e(report.status)} · report written "
        f"{e(_when(report.generated_at))}"
    )
    title = f"fedround report: {report.federation} run {report.run_id}"
    return _page(title, subtitle, sections, _notes(report.notes))


# --- the tenant dashboard ---------------------------------------------------------------


def _registered(versions: Sequence[VersionInfo]) -> str:
    if not versions:
        return '<span class="muted">none</span>'
    return "<br>".join(
        f"<code>{e(v.name)}</code> v{e(v.version)}"
        + (f" ({e(', '.join(v.aliases))})" if v.aliases else "")
        for v in versions
    )


def render_tenant(report: TenantReport) -> str:
    """The dashboard of a tenant's runs, as a complete HTML document."""
    charts = _Charts()
    chart = _tenant_chart(charts, report) or '<p class="muted">No run has a final metric.</p>'
    table = _table(
        [
            "started",
            "federation",
            "run id",
            "status",
            "rounds",
            "final metric",
            "sites",
            "registered",
        ],
        [
            [
                e(_when(run.started_at)),
                e(run.federation),
                f"<code>{e(run.run_id)}</code>",
                f'<span class="badge {e(run.status)}">{e(run.status)}</span>',
                f"{run.rounds_completed}"
                + (f" / {run.rounds_planned}" if run.rounds_planned else ""),
                f"<code>{e(run.metric)}</code> {_metric(run.final_value)}",
                f"{run.sites_trained} of {run.sites_listed}",
                _registered(run.versions),
            ]
            for run in report.runs
        ],
        numeric=(4,),
        caption="Newest first. Rounds: recorded / planned. Sites: trained in at least one "
        "round, of those listed. Details of a run: <code>fedround report &lt;run id&gt;</code>.",
    )
    federations = sorted({run.federation for run in report.runs})
    sections = [
        ("trend", "Final metric per run", chart),
        ("runs", f"Runs ({len(report.runs)})", table),
    ]
    subtitle = (
        f"{len(report.runs)} run{'s' * (len(report.runs) != 1)} in {len(federations)} "
        f"federation{'s' * (len(federations) != 1)}: "
        f"{e(', '.join(federations))} · MLflow at <code>{e(report.tracking)}</code> · "
        f"written {e(_when(report.generated_at))}"
    )
    return _page(f"fedround dashboard: tenant {report.tenant}", subtitle, sections, "")
