"""``fedround report``: one self-contained HTML file about a training run, or a dashboard of
all runs of a tenant (registered into the ``fedround`` app by ``flows/cli/main.py``).

The facts come from MLflow (the embedded sqlite store under the state dir, or the server at
``MLFLOW_TRACKING_URI``) and the object store's audit log
(:mod:`fedround.tasks.report_data`); the page is drawn by :mod:`fedround.tasks.report_html`.

Exit codes: 0 written (its path is printed), 1 an unknown run or tenant (the known ones are
listed) or an unreadable store, 2 a usage error (neither or both of RUN_ID and --tenant).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from fedround.flows import environment
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.runtime import DEFAULT_STATE_DIR

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="FEDROUND_STATE_DIR",
        help="Where Prefect, MLflow, the object store and run results live.",
    ),
]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def default_output(state_dir: Path, run_id: str | None, tenant: str | None) -> Path:
    """``<state>/reports/<run-id>.html``, or ``<state>/reports/tenant-<tenant>.html``."""
    name = f"{run_id}.html" if run_id else f"tenant-{tenant}.html"
    return state_dir / "reports" / name


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: one rename
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def report(
    run_id: Annotated[
        str | None, typer.Argument(help="Training run id (as `fedround run` printed it).")
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="Instead of one run: a dashboard of all runs of this tenant."),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="The HTML file to write (default: <state-dir>/reports/<run-id>.html, or "
            "tenant-<tenant>.html).",
        ),
    ] = None,
) -> None:
    """Write one self-contained HTML report of a training run (metrics per round,
    participation per site and round, time and bytes, data contracts, registered versions
    and their promotion history, cost), or with --tenant a dashboard of the tenant's runs.
    Prints the file's path."""
    if (run_id is None) == (tenant is None):
        _fail("give a run id or --tenant TENANT (exactly one of them)", 2)
    state = state_dir.resolve()
    environment.configure(state)
    try:
        from fedround.tasks.runtime import CoordinatorSettings

        settings = CoordinatorSettings.from_env()
        if tenant is not None:
            from fedround.tasks.report_data import gather_tenant
            from fedround.tasks.report_html import render_tenant

            page = render_tenant(gather_tenant(settings, tenant))
        else:
            from fedround.tasks.report_data import gather_run
            from fedround.tasks.report_html import render_run

            page = render_run(gather_run(settings, str(run_id)))
    except FedroundError as exc:
        _fail(str(exc))
    target = (out or default_output(state, run_id, tenant)).resolve()
    try:
        write_atomically(target, page)
    except OSError as exc:
        _fail(f"cannot write {target}: {exc.strerror or exc}; choose another --out")
    typer.echo(str(target))


def register(app: typer.Typer) -> None:
    app.command()(report)
