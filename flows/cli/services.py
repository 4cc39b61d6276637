"""``fedround up`` / ``down`` / ``status`` / ``env`` / ``credentials``: the local service stack.

``up`` starts S3, MLflow and Prefect on 127.0.0.1 as background daemons and returns once
they are healthy; ``down`` stops them. Secrets are printed only by ``env`` and
``credentials``, which exist to print them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
import yaml

from fedround.tasks.core.errors import FedroundError
from fedround.tasks.runtime import DEFAULT_STATE_DIR

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="FEDROUND_STATE_DIR",
        help="Folder whose services/ subfolder holds the services' data, logs and keys.",
    ),
]
SECRET_NAMES = ("FEDROUND_S3_SECRET_KEY",)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _log_progress() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("fedround: %(message)s"))
    for name in ("fedround.flows.services.stack", "fedround.flows.services.proc"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addHandler(handler)


def _federations(configs: list[Path]) -> dict[str, list[str]]:
    from fedround.tasks.core.config import load_federation_config

    found: dict[str, list[str]] = {}
    for path in configs:
        config = load_federation_config(path)
        found.setdefault(config.federation, []).extend(s.name for s in config.sites)
    return found


def up(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    config: Annotated[
        list[Path] | None,
        typer.Option(
            "--config", help="Federation config(s): an S3 identity is made for each site."
        ),
    ] = None,
    prefect_db: Annotated[
        str, typer.Option(help="Prefect's database: auto (Postgres if installed), sqlite, postgres")
    ] = "auto",
    s3_port: Annotated[int | None, typer.Option(help="S3 port (default: a free one)")] = None,
    mlflow_port: Annotated[int | None, typer.Option(help="MLflow port")] = None,
    prefect_port: Annotated[int | None, typer.Option(help="Prefect port")] = None,
    ui: Annotated[bool, typer.Option(help="Serve the Prefect UI")] = True,
) -> None:
    """Start S3, MLflow and Prefect servers on 127.0.0.1 in the background."""
    from fedround.flows.services.stack import Ports, ServiceStack, export_lines

    if prefect_db not in {"auto", "sqlite", "postgres"}:
        _fail(f"--prefect-db must be auto, sqlite or postgres, not {prefect_db!r}")
    _log_progress()
    state = state_dir.resolve()
    try:
        federations = _federations(config or [])
        typer.echo(f"fedround: starting S3, MLflow and Prefect under {state / 'services'} ...")
        stack = ServiceStack(state, ui=ui)
        endpoints = stack.start(
            ports=Ports(s3=s3_port, mlflow=mlflow_port, prefect=prefect_port),
            prefect_db=prefect_db,  # type: ignore[arg-type]
            federations=federations,
        )
    except FedroundError as exc:
        _fail(str(exc))
        return
    lines = [
        "",
        f"Prefect UI   {endpoints.prefect_ui_url}   (database: {endpoints.prefect_db})",
        f"MLflow UI    {endpoints.mlflow_tracking_uri}",
        f"S3           {endpoints.s3_url}   buckets: {endpoints.s3_bucket} (versioned), "
        f"{endpoints.mlflow_bucket}",
    ]
    for federation, sites in federations.items():
        lines.append(f"Site keys    {federation}: {', '.join(sites)} (fedround credentials)")
    lines += [
        "",
        "Client environment (the coordinator's; the admin secret is left out here):",
        *export_lines(endpoints.env(), hide=SECRET_NAMES),
        f'eval "$(fedround env --state-dir {state})"   # all of it, admin secret included',
        "",
        f"Stop with: fedround down --state-dir {state}",
    ]
    typer.echo("\n".join(lines))


def down(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    purge: Annotated[
        bool, typer.Option(help="Also delete the services' data (keys and logs stay)")
    ] = False,
) -> None:
    """Stop the services `fedround up` started, and the local Prefect server and MLflow UI
    that `fedround run` keeps up (stale pid files are cleaned up too)."""
    from fedround.flows.services.local_ui import LocalServers
    from fedround.flows.services.stack import down as stop_all

    _log_progress()
    try:
        local = LocalServers(state_dir.resolve()).stop()
        stopped = stop_all(state_dir.resolve(), purge=purge)
    except FedroundError as exc:
        _fail(str(exc))
        return
    stopped += [f"local {name} server" for name in local]
    typer.echo(f"fedround: stopped {', '.join(stopped)}" if stopped else "fedround: none running")


def status(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Which services run, where, and whether they are healthy."""
    from dataclasses import asdict

    from fedround.flows.services.stack import status as read_status

    rows = read_status(state_dir.resolve())
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    for row in rows:
        state = "healthy" if row.healthy else ("running, NOT healthy" if row.running else "down")
        where = row.url or "-"
        extra = f"  pid {row.pid}" if row.running else ""
        note = f"  ({row.detail})" if row.detail else ""
        typer.echo(f"{row.name:<9} {state:<21} {where}{extra}{note}")
    if not any(r.running and not r.healthy for r in rows):
        return
    raise typer.Exit(1)


def env(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    site: Annotated[
        str | None,
        typer.Option(help="FEDERATION/SITE: the site's own S3 keys instead of the admin's"),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(
            help="TENANT/FEDERATION: the tenant coordinator's S3 keys (its own federations "
            "and ledgers only), granted FEDERATION, instead of the admin's"
        ),
    ] = None,
) -> None:
    """Print `export` lines for clients, secrets included (eval "$(fedround env)")."""
    from fedround.flows.services.stack import export_lines, load_endpoints

    if site and tenant:
        _fail("give --site or --tenant, not both")
    try:
        endpoints = load_endpoints(state_dir.resolve())
        if tenant:
            name, _, federation = tenant.partition("/")
            if not name or not federation:
                _fail("--tenant must look like TENANT/FEDERATION")
            values = endpoints.tenant_env(name, federation)
        elif site:
            federation, _, name = site.partition("/")
            if not name:
                _fail("--site must look like FEDERATION/SITE")
            values = endpoints.site_env(federation, name)
        else:
            values = endpoints.env()
    except FedroundError as exc:
        _fail(str(exc))
        return
    typer.echo("\n".join(export_lines(values)))


def credentials(
    federation: Annotated[str, typer.Argument(help="Federation name")],
    site: Annotated[str, typer.Argument(help="Site name")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Print a site's S3 credentials as the object_store block of its site.yaml (secret!)."""
    from fedround.flows.services.stack import add_site_identities

    try:
        creds = add_site_identities(state_dir.resolve(), federation, [site])[site]
    except FedroundError as exc:
        _fail(str(exc))
        return
    block = {"object_store": creds.object_store_settings()}
    typer.echo(yaml.safe_dump(block, sort_keys=False).rstrip())


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``fedround`` app."""
    app.command("up")(up)
    app.command("down")(down)
    app.command("status")(status)
    app.command("env")(env)
    app.command("credentials")(credentials)
