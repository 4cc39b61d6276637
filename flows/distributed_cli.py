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
    """Run the Prefect worker for the federation's coordinator pool (foreground)."""
    from fedround.site_workers.worker import WORKER_ENV
    from fedround.tasks.core.config import load_federation_config

    try:
        loaded = load_federation_config(config)
    except FedroundError as exc:
        _fail(str(exc))
    if not os.environ.get("PREFECT_API_URL"):
        _fail("PREFECT_API_URL is not set (start services with `fedround up` and export them)")
    prefect = Path(sys.executable).with_name("prefect")
    argv = [str(prefect), "worker", "start", "--pool", loaded.coordinator_pool, "--type", "process"]
    env = {**{k: v for k, v in WORKER_ENV.items() if k not in os.environ}, **os.environ}
    os.execvpe(argv[0], argv, env)


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy_command)
    app.add_typer(site_app, name="site")
    app.add_typer(coordinator_app, name="coordinator")
