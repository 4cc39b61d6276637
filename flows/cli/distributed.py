"""Commands for running a federation across work pools: deploy, site and coordinator workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedround.tasks.core.errors import FedroundError

site_app = typer.Typer(help="Commands a site operator runs at the site.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Commands for the coordinator's machine.", no_args_is_help=True)
demo_app = typer.Typer(help="Simulated sites for pilots and demos.", no_args_is_help=True)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def deploy_command(
    config: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    project_dir: Annotated[
        Path,
        typer.Option(help="Directory the deployments run in; config paths are relative to it."),
    ] = Path("."),
    render_only: Annotated[
        bool, typer.Option("--render-only", help="Print the prefect.yaml, create nothing.")
    ] = False,
) -> None:
    """Create the federation's work pools and Prefect deployments (coordinator + every site)."""
    from fedround.flows.deploy import deploy, render_prefect_yaml
    from fedround.tasks.core.config import load_federation_config
    from fedround.tasks.runtime import state_dir_from_env

    try:
        loaded = load_federation_config(config)
        if render_only:
            relative = os.path.relpath(config.resolve(), project_dir.resolve())
            typer.echo(render_prefect_yaml(loaded, relative), nl=False)
            return
        used = deploy(loaded, config, project_dir, state_dir_from_env() / "deploy")
    except FedroundError as exc:
        _fail(str(exc))
    pools = ", ".join([loaded.coordinator_pool, *(loaded.work_pool(s.name) for s in loaded.sites)])
    typer.echo(
        f"deployed {loaded.federation} ({used}):\n"
        f"  pools        {pools}\n"
        f"  schedule     {loaded.schedule.cron} ({loaded.schedule.timezone})\n"
        f"  run it now   prefect deployment run fedround-training/{loaded.federation}\n"
        f"  coordinator  fedround coordinator start {config}\n"
        "  each site    fedround site start --config <site.yaml>"
    )


@site_app.command("start")
def site_start(
    config: Annotated[Path, typer.Option("--config", help="The site's settings (YAML).")],
) -> None:
    """Run the Prefect worker for this site's work pool (foreground; stop with Ctrl-C)."""
    from fedround.site_workers.worker import start_site_worker

    try:
        start_site_worker(config)
    except FedroundError as exc:
        _fail(str(exc))


@coordinator_app.command("start")
def coordinator_start(
    config: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
) -> None:
    """Run the Prefect worker for the federation's coordinator pool (foreground); it runs
    only fedround's training, promotion and rollback flows."""
    from fedround.site_workers.worker import WORKER_ENV
    from fedround.tasks.core.config import load_federation_config

    try:
        loaded = load_federation_config(config)
    except FedroundError as exc:
        _fail(str(exc))
    if not os.environ.get("PREFECT_API_URL"):
        _fail("PREFECT_API_URL is not set (start services with `fedround up` and export them)")
    # Prefect's process worker, refusing anything but fedround's coordinator flows.
    argv = [
        sys.executable,
        "-m",
        "fedround.flows.coordinator_worker",
        "--pool",
        loaded.coordinator_pool,
    ]
    env = {**{k: v for k, v in WORKER_ENV.items() if k not in os.environ}, **os.environ}
    os.execvpe(argv[0], argv, env)


@demo_app.command("provision")
def demo_provision(
    config: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
) -> None:
    """Give each simulated site its data shard and a site config.

    With services started by `fedround up` under the same state dir, every site gets its
    own S3 credentials (it may read the federation's global models and write only its own
    updates) and the Prefect API URL, ready for `fedround site start`.
    """
    from pydantic import SecretStr

    from fedround.site_workers.demo_sites import provision_demo_sites
    from fedround.site_workers.signing_key import provision_site_keys
    from fedround.tasks.core.config import load_federation_config
    from fedround.tasks.object_store import ObjectStoreSettings, open_store
    from fedround.tasks.runtime import CoordinatorSettings, state_dir_from_env

    try:
        loaded = load_federation_config(config)
        settings = CoordinatorSettings.from_env()
        state = state_dir_from_env()
        site_store = None
        api_url = os.environ.get("PREFECT_API_URL")
        coordinator_store = settings.object_store
        if (state / "services" / "endpoints.json").exists():
            from fedround.flows.services import stack

            credentials = stack.add_site_identities(
                state, loaded.federation, [s.name for s in loaded.sites]
            )
            endpoints = stack.load_endpoints(state)
            api_url = endpoints.prefect_api_url
            coordinator_store = ObjectStoreSettings(  # where the coordinator reads keys
                kind="s3",
                endpoint=endpoints.s3_endpoint,
                bucket=endpoints.s3_bucket,
                region=endpoints.s3_region,
                access_key=endpoints.admin_access_key,
                secret_key=SecretStr(endpoints.admin_secret_key),
            )

            def site_store(site: str) -> ObjectStoreSettings:
                return ObjectStoreSettings.model_validate(credentials[site].object_store_settings())

        paths = provision_demo_sites(loaded, settings, site_store, api_url)
        provision_site_keys(paths, open_store(coordinator_store), loaded.federation)
    except FedroundError as exc:
        _fail(str(exc))
    typer.echo(f"{len(paths)} sites of {loaded.federation}; start each one's worker with:")
    for path in paths.values():
        typer.echo(f"  fedround site start --config {path}")


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy_command)
    app.add_typer(site_app, name="site")
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(demo_app, name="demo")
