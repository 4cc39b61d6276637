"""``fedround certs``: TLS certificates for a deployment's servers (registered into the
``fedround`` app by ``flows/cli/main.py``; the work is :mod:`fedround.tasks.certificates`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedround.tasks.core.errors import FedroundError

certs_app = typer.Typer(
    help="TLS certificates for the production profile: a private CA and a server certificate.",
    no_args_is_help=True,
)


def init(
    out: Annotated[Path, typer.Option(help="folder for ca.crt, ca.key, server.crt, server.key")],
    host: Annotated[
        list[str],
        typer.Option(help="a DNS name or IP address clients use (repeat for each)"),
    ],
    days: Annotated[int, typer.Option(help="validity of the server certificate")] = 397,
    renew: Annotated[
        bool, typer.Option(help="replace the server certificate, keeping the CA")
    ] = False,
) -> None:
    """Write a CA (unless OUT holds one) and a server certificate for the given hosts."""
    from fedround.tasks.certificates import certificate_hosts, make_certificates

    try:
        files = make_certificates(out, host, days, renew=renew)
    except FedroundError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"server certificate {files.cert} for {', '.join(certificate_hosts(files.cert))}")
    typer.echo(f"  key {files.key} (0600): mount it into the servers only")
    typer.echo(f"CA certificate {files.ca_cert}: every client trusts it")
    typer.echo(f"  key {files.ca_key} (0600): keep it offline; it signs the next --renew")
    typer.echo(
        "clients: PREFECT_API_SSL_CERT_FILE, MLFLOW_TRACKING_SERVER_CERT_PATH and SSL_CERT_FILE "
        f"(S3) = {files.ca_cert}"
    )


certs_app.command("init")(init)


def register(app: typer.Typer) -> None:
    app.add_typer(certs_app, name="certs")
