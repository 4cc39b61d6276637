"""Training plots for the MLflow UI: accuracy and loss per round, globally and per site.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, safe in
threads). The global curve is the coordinator's held-out evaluation; each site's curve is
its local training metric, the only per-site figure a training round reports.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

Series = list[tuple[int, float]]

PLOTS = {
    "accuracy": ("train_accuracy", "Accuracy"),
    "loss": ("train_loss", "Loss"),
}


def training_plots(
    global_series: Mapping[str, Series], site_series: Mapping[str, Mapping[str, Series]]
) -> dict[str, bytes]:
    """``{"accuracy.png": …, "loss.png": …}``; a plot with no data at all is left out."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    pngs = {}
    for metric, (site_metric, label) in PLOTS.items():
        figure = Figure(figsize=(8, 5), layout="constrained")
        axes = figure.subplots()
        drawn = False
        for site in sorted(site_series):
            points = sorted(site_series[site].get(site_metric, []))
            if points:
                axes.plot(*zip(*points, strict=True), lw=1, alpha=0.75, marker=".", label=site)
                drawn = True
        points = sorted(global_series.get(metric, []))
        if points:
            axes.plot(*zip(*points, strict=True), lw=2.5, color="black", label="global (held-out)")
            drawn = True
        if not drawn:
            continue
        axes.set_title(f"{label} per round: global model and each site's local training")
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(label.lower())
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", ncol=2)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        pngs[f"{metric}.png"] = buffer.getvalue()
    return pngs


def metric_chart(
    metric: str,
    global_points: Series,
    site_points: Mapping[str, Series],
    site_metric: str | None = None,
    dpi: int = 72,
) -> bytes | None:
    """One PNG: ``metric`` of the global model per round (bold) and each site's
    ``site_metric`` per round (thin); ``None`` when there is nothing to draw."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not global_points and not any(site_points.values()):
        return None
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    for site in sorted(site_points):
        points = sorted(site_points[site])
        if points:
            axes.plot(*zip(*points, strict=True), lw=1, alpha=0.6, marker=".", label=site)
    if global_points:
        points = sorted(global_points)
        axes.plot(*zip(*points, strict=True), lw=2.5, color="black", label=f"global {metric}")
    title = f"{metric} of the global model per round"
    if site_metric and any(site_points.values()):
        title += f", and each site's {site_metric}"
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if len(site_points) <= 20:
        axes.legend(fontsize="small", ncol=2)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
