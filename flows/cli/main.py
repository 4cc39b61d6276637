"""The ``fedround`` app: the ``run`` command, the entry point ``main``, and the other command
groups of this package registered into the app."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedround.flows import environment
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.runtime import DEFAULT_STATE_DIR

app = typer.Typer(
    name="fedround",
    help="Federated learning as observable, retryable Prefect flows, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="FEDROUND_STATE_DIR",
        help="Where Prefect, MLflow, the object store and run results live.",
    ),
]


@app.callback()
def _main() -> None:
    """fedround: federated learning as observable, retryable Prefect flows."""


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


NO_HOLDOUT = "no central held-out set (set evaluation.holdout); see per-site metrics in MLflow"


def metric_lines(metrics: dict[str, float], lead: str | None = None) -> list[str]:
    """The final metrics of the central evaluation, ``lead`` (evaluation.metric) first; or
    one line saying there is no central held-out set."""
    if not metrics:
        return [f"  {'metrics':<12} {NO_HOLDOUT}"]
    order = sorted(metrics, key=lambda name: (name != lead, name != "loss", name))
    first, *rest = order
    line = f"  {first:<12} {metrics[first]:.4f} on the held-out set"
    if rest:
        line += " (" + ", ".join(f"{name} {metrics[name]:.4f}" for name in rest) + ")"
    return [line]


def print_summary(
    result: dict[str, Any], result_file: Path, state_dir: Path, metric: str | None = None
) -> None:
    """The run's summary; ``metric`` (the federation's evaluation.metric) leads."""
    metrics = result["final_metrics"]
    model = result.get("model") or {}
    sites = result["sites"]
    lines = [
        f"fedround: run {result['run_id']} of federation {result['federation']} finished",
        f"  rounds       {result['rounds']} (resumed from round {result['resumed_from_round']})",
        *metric_lines(metrics, metric),
        f"  sites        {len(sites['participating'])} took part, "
        f"{len(sites['excluded'])} excluded",
    ]
    lines += [f"    excluded   {why}" for why in sites["excluded"].values()]
    if model:
        lines.append(
            f"  model        {model['name']} version {model['version']} "
            f"(alias {model['alias']}): {model['uri']}"
        )
    lines += [
        f"  checkpoint   {result['checkpoint']['uri']} "
        f"(sha256 {result['checkpoint']['weights_sha256'][:16]}…)",
        f"  time         {result['timings']['flow_seconds']:.1f}s in the flow, median round "
        f"{result['timings']['round_median_seconds']:.2f}s",
        f"  result       {result_file}",
        "",
        *look_closer(result, state_dir),
    ]
    typer.echo("\n".join(lines))


def look_closer(result: dict[str, Any], state_dir: Path) -> list[str]:
    """Where to see the run: its pages in the running UIs, or how to start them."""
    import os

    from fedround.flows.round_artifacts import mlflow_ui_url

    prefect_api = os.environ.get("PREFECT_API_URL", "")
    tracking = result["mlflow"]["tracking_uri"]
    mlflow_ui = mlflow_ui_url(tracking)
    lines = ["Look closer:"]
    flow_run = result.get("prefect", {}).get("flow_run_id")
    if prefect_api and flow_run:
        ui = prefect_api.removesuffix("/").removesuffix("/api")
        lines.append(f"  Prefect UI   {ui}/runs/flow-run/{flow_run}")
    else:
        tools = Path(sys.executable).parent
        lines.append(
            f"  Prefect UI   PREFECT_HOME={state_dir / 'prefect'} PREFECT_SERVER_ANALYTICS_ENABLED"
            f"=false {tools / 'prefect'} server start --port 4200   (then http://127.0.0.1:4200)"
        )
    experiment = result["mlflow"].get("experiment_id")
    if mlflow_ui and experiment:
        lines.append(
            f"  MLflow UI    {mlflow_ui}/#/experiments/{experiment}/runs/"
            f"{result['mlflow']['run_id']}"
        )
    else:
        tools = Path(sys.executable).parent
        lines.append(
            f"  MLflow UI    MLFLOW_DISABLE_TELEMETRY=true {tools / 'mlflow'} ui --port 5000 "
            f"--backend-store-uri {tracking}"
        )
    lines.append(f"  Report       fedround report {result['run_id']} --state-dir {state_dir}")
    return lines


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Federation config (YAML).")],
    run_id: Annotated[
        str | None,
        typer.Option(help="Run id; an existing run's id resumes it from its last checkpoint."),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    processes: Annotated[
        int | None, typer.Option(help="Local site hosts, processes serving the sites (embedded).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run's result as JSON on the last line.")
    ] = False,
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="Send site work to each site's work pool on the Prefect server at "
            "PREFECT_API_URL (after `fedround deploy`), instead of local processes.",
        ),
    ] = False,
    init_from: Annotated[
        str | None,
        typer.Option(
            help="Start from a registered model's weights (a fine-tune), e.g. "
            "models:/mnist-demo-global@production."
        ),
    ] = None,
    allow_dirty: Annotated[
        bool,
        typer.Option(
            "--allow-dirty",
            envvar="FEDROUND_ALLOW_DIRTY",
            help="Run even if the config or its suite has uncommitted changes (recorded).",
        ),
    ] = False,
) -> None:
    """Run a federation: on the embedded default (all sites on this machine), or with
    --distributed through the sites' own Prefect work pools."""
    state = state_dir.resolve()
    environment.configure(state)
    options: dict[str, Any] = {"init_from": init_from, "allow_dirty": allow_dirty}
    servers, ready = None, None
    try:
        if not distributed:
            servers, ready = _local_servers(state)
    except FedroundError as exc:
        _fail(str(exc))
    try:
        from fedround.tasks.core.keys import check_run_id
        from fedround.tasks.run_lineage import precheck

        if run_id is not None:
            check_run_id(run_id)
        precheck(config.resolve(), allow_dirty)  # refuse a dirty config before starting
        if distributed:
            result = _run_distributed(config.resolve(), run_id, **options)
        else:
            result = _run_embedded(config.resolve(), run_id, processes, ready, **options)
    except FedroundError as exc:
        _fail(str(exc), 2 if "config" in type(exc).__name__.lower() else 1)
    finally:
        if servers is not None:
            servers.release()
    result_file = state / "runs" / result["run_id"] / "result.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    print_summary(result, result_file, state, _lead_metric(config))
    if as_json:
        typer.echo(json.dumps(result))


def _lead_metric(config: Path) -> str | None:
    from fedround.tasks.core.config import load_federation_config

    try:
        return load_federation_config(config).evaluation.metric
    except FedroundError:
        return None


def _run_distributed(config_path: Path, run_id: str | None, **options: Any) -> dict[str, Any]:
    import os

    from fedround.tasks.core.errors import ConfigError

    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "--distributed needs a Prefect server: set PREFECT_API_URL (see `fedround up`)"
        )
    from fedround.flows.training import new_run_id, train_federation

    environment.quiet_known_errors()
    result = train_federation(
        config_path=str(config_path), run_id=run_id or new_run_id(), **options
    )
    return result.model_dump(mode="json")


def _local_servers(state: Path) -> tuple[Any, Any]:
    """The embedded default's long-lived local Prefect server and MLflow UI (started on
    first use, reused later); ``(None, None)`` when switched off or a server is configured."""
    import os

    from fedround.flows.services import local_ui

    if os.environ.get("PREFECT_API_URL") or not local_ui.enabled():
        return None, None
    servers = local_ui.LocalServers(state)
    endpoints, ready = servers.ensure()
    for notice in endpoints.notices:
        typer.secho(f"fedround: {notice}", err=True, fg=typer.colors.YELLOW)
    if endpoints.started:
        typer.echo(
            f"fedround: starting the local {' and '.join(endpoints.started)} server(s) in the "
            f"background (they stay up for later runs; `fedround down` stops them)",
            err=True,
        )
    os.environ["PREFECT_API_URL"] = endpoints.prefect_api_url
    os.environ[local_ui.MLFLOW_UI_ENV] = endpoints.mlflow_ui_url
    return servers, ready


def _run_embedded(
    config_path: Path,
    run_id: str | None,
    processes: int | None,
    ready: Any = None,
    **options: Any,
) -> dict[str, Any]:
    from fedround.flows.dispatch import embedded_federation

    with embedded_federation(config_path, processes, ready):
        from fedround.flows.training import new_run_id, train_federation

        environment.quiet_known_errors()
        result = train_federation(
            config_path=str(config_path), run_id=run_id or new_run_id(), **options
        )
        return result.model_dump(mode="json")


# The other command groups are modules of this package; each exposes
# ``register(app: typer.Typer) -> None`` and is listed here.
COMMAND_MODULES: list[str] = [
    "fedround.flows.cli.distributed",
    "fedround.flows.cli.services",
    "fedround.flows.cli.lifecycle",
    "fedround.flows.cli.site_onboarding",
    "fedround.flows.cli.contract",
    "fedround.flows.cli.privacy",
    "fedround.flows.cli.report",
    "fedround.flows.cli.keys",
    "fedround.flows.cli.certs",
]


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
