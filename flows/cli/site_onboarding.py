"""``fedround site init`` and ``fedround site check``: a site operator's first two commands.

They join the ``site`` group (``site start`` lives in :mod:`.distributed`); the logic is in
:mod:`fedround.site_workers.onboarding`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedround.tasks.core.errors import FedroundError


def _fail(message: str, details: list[str] | None = None) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    for line in details or []:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(1)


def site_init(
    federation: Annotated[str, typer.Option(help="The federation this site joins.")],
    site: Annotated[str, typer.Option(help="This site's name in the federation.")],
    data: Annotated[
        Path, typer.Option(help="The site's training file (.parquet, .csv, .npz), anywhere.")
    ],
    test_data: Annotated[
        Path | None,
        typer.Option(help="The site's held-out file, for federated evaluation (promotion)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write the site config.")] = Path("site.yaml"),
    object_store: Annotated[
        str | None,
        typer.Option(
            help="local:<folder>, or s3 with --endpoint and --bucket. Default: the embedded "
            "default's store, $FEDROUND_STATE_DIR/objects."
        ),
    ] = None,
    endpoint: Annotated[str | None, typer.Option(help="S3: host:port.")] = None,
    bucket: Annotated[str | None, typer.Option(help="S3: the federation's bucket.")] = None,
    region: Annotated[str | None, typer.Option(help="S3: region.")] = None,
    secure: Annotated[bool, typer.Option("--secure", help="S3: use HTTPS.")] = False,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            help="S3 keys (YAML access_key/secret_key, or FEDROUND_S3_ACCESS_KEY=… lines). "
            "Otherwise they are read from FEDROUND_S3_ACCESS_KEY / FEDROUND_S3_SECRET_KEY; "
            "never from a flag, so they stay out of shell history."
        ),
    ] = None,
    federation_config: Annotated[
        Path | None,
        typer.Option(help="The federation config: read the data the way it declares (loader)."),
    ] = None,
    work_pool: Annotated[
        str | None, typer.Option(help="Defaults to '<federation>-<site>'.")
    ] = None,
    prefect_api_url: Annotated[
        str | None, typer.Option(help="The coordinator's Prefect API (else $PREFECT_API_URL).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
) -> None:
    """Write this site's config (mode 0600) for data you already have, wherever it lives.

    The data stays where it is: site.yaml names its folder and files. Then run
    `fedround site check` to rehearse a round here, and `fedround site start`.
    """
    from fedround.site_workers.onboarding import init_site, object_store_settings
    from fedround.tasks.core.config import load_federation_config
    from fedround.tasks.runtime import state_dir_from_env

    try:
        store, credentials = object_store_settings(
            object_store or f"local:{state_dir_from_env() / 'objects'}",
            endpoint=endpoint,
            bucket=bucket,
            region=region,
            secure=secure,
            secret_file=secret_file,
        )
        done = init_site(
            federation=federation,
            site=site,
            train=data,
            test=test_data,
            out=out,
            store=store,
            federation_config=load_federation_config(federation_config)
            if federation_config
            else None,
            work_pool=work_pool,
            prefect_api_url=prefect_api_url,
            credentials=credentials,
            force=force,
        )
    except FedroundError as exc:
        _fail(str(exc))
        return
    settings = done.settings
    where = settings.object_store.root or f"s3://{settings.object_store.bucket}"
    lines = [
        f"wrote {out} (mode 0600) for site {settings.site} of federation {settings.federation}",
        f"  data dir     {settings.data_dir}",
        *(f"  file         {name}: {what}" for name, what in done.data.items()),
        f"  store        {settings.object_store.kind}: {where}",
        f"  credentials  {done.credentials}",
        f"  work pool    {settings.pool}",
        f"  signing key  {settings.signing_key_path} (mode 0600, key id {done.key_id})",
        "register this site's public key at the coordinator:",
        f"  fedround keys register --federation {settings.federation} --site {settings.site} "
        f"--public-key {done.public_key}",
        "next:",
        f"  fedround site check --config {out} --federation-config <federation.yaml>",
        f"  fedround site start --config {out}",
    ]
    typer.echo("\n".join(lines))


def site_check(
    config: Annotated[Path, typer.Option("--config", help="The site's settings (YAML).")],
    federation_config: Annotated[
        Path, typer.Option(help="The federation config (YAML) with its contract beside it.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Rehearse a round here, with no server: what would leave this site, what stays.

    Runs the federation's data contract on this site's data, then one training step of
    its model (one batch), and checks the update as the coordinator would. For tables the
    preprocessing statistics are normally merged across sites; the dry step uses this
    site's own. Nothing is sent anywhere. Exits 1 with one line naming the problem.
    """
    from fedround.site_workers.onboarding import check_site

    report = check_site(config, federation_config)
    if as_json:
        typer.echo(json.dumps(report.model_dump(mode="json")))
        if not report.ok:
            raise typer.Exit(1)
        return
    if not report.ok:
        _fail(f"{report.error} [{report.stage}]", report.details)
    assert report.contract is not None and report.update is not None  # set when ok
    update = report.update
    model = report.model
    args = ", ".join(f"{k}={v!r}" for k, v in model["arguments"].items())
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in update.metrics.items())
    lines = [
        f"fedround: site {report.site} is ready for {report.federation} "
        "(a dry run: nothing was sent)",
        *(f"  {what:<12} {text}" for what, text in report.data.items()),
        f"  contract     {report.contract.summary()} ({len(report.contract.results)} rules)",
        f"  model        {model['factory']}({args}): {model['parameters']:,} parameters",
        f"  dry step     {update.num_examples} examples, one batch: {metrics}",
        "What would leave this site:",
        *(f"  - {line}" for line in report.leaves),
        "  the update's tensors:",
        *(
            f"      {t.name:<28} {t.dtype:<8} {tuple(t.shape)!s:<14} {t.nbytes:>10,} bytes"
            for t in update.tensors
        ),
        "What stays here:",
        *(f"  - {line}" for line in report.stays),
        *(f"note: {line}" for line in report.notes),
    ]
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add ``init`` and ``check`` to the ``site`` group that :mod:`.distributed` creates."""
    from .distributed import site_app

    site_app.command("init")(site_init)
    site_app.command("check")(site_check)
