"""Deployments for a federation: one coordinator deployment, one session and one evaluation
deployment per site pool, rendered as a ``prefect.yaml`` and applied with ``prefect deploy``.

``deployments/prefect.yaml`` is this rendering for the demo federation (a test keeps the
two identical). Paths inside it are relative to ``$FEDROUND_PROJECT_DIR``, which
``prefect deploy`` resolves when the deployments are created.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fedround.flows.distributed import EVALUATION_DEPLOYMENT, SESSION_DEPLOYMENT
from fedround.flows.entrypoints import LIFECYCLE_DEPLOYMENTS, PROJECT_DIR_ENV, TRAINING_ENTRYPOINT
from fedround.site_workers.session import EVALUATION_ENTRYPOINT, SESSION_ENTRYPOINT
from fedround.tasks.alerts import check_alerts, ensure_automations
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.core.errors import FedroundError

HEADER = """\
# Prefect deployments of federation {federation}, rendered from {config}
# by `fedround deploy --render-only`: edit the federation config, not this file.
#   coordinator: fedround-training/{federation} in pool {coordinator}, cron "{cron}" ({tz})
#   on demand:   fedround-promotion/{federation} and fedround-rollback/{federation}, same pool
#   each site:   {session}/<pool> and {evaluation}/<pool> in the site's own pool
# Apply with `fedround deploy {config}`, or with
#   FEDROUND_PROJECT_DIR=$PWD prefect --no-prompt deploy --all --prefect-file <this file>
"""


def render_prefect_yaml(config: FederationConfig, config_path: str) -> str:
    """The ``prefect.yaml`` for ``config``; ``config_path`` is relative to the project dir."""
    project_dir = "{{ $" + PROJECT_DIR_ENV + " }}"
    deployments: list[dict[str, Any]] = [
        {
            "name": config.federation,
            "description": f"Federated training of {config.federation} (tenant {config.tenant})",
            "entrypoint": TRAINING_ENTRYPOINT,
            "parameters": {"config_path": config_path},
            "work_pool": {"name": config.coordinator_pool},
            "concurrency_limit": 1,
            "tags": [f"federation:{config.federation}", f"tenant:{config.tenant}"],
            "schedules": [
                {
                    "cron": config.schedule.cron,
                    "timezone": config.schedule.timezone,
                    "active": config.schedule.active,
                }
            ],
        }
    ]
    for _flow_name, entrypoint, what in LIFECYCLE_DEPLOYMENTS:
        deployments.append(
            {
                "name": config.federation,
                "description": f"{what} ({config.federation})",
                "entrypoint": entrypoint,
                "parameters": {"config_path": config_path},
                "work_pool": {"name": config.coordinator_pool},
                "concurrency_limit": 1,
                "tags": [f"federation:{config.federation}", f"tenant:{config.tenant}"],
            }
        )
    for site in config.sites:
        pool = config.work_pool(site.name)
        for flow_name, entrypoint in (
            (SESSION_DEPLOYMENT, SESSION_ENTRYPOINT),
            (EVALUATION_DEPLOYMENT, EVALUATION_ENTRYPOINT),
        ):
            deployments.append(
                {
                    "name": pool,
                    "description": f"{flow_name} for site {site.name} of {config.federation}",
                    "entrypoint": entrypoint,
                    "work_pool": {"name": pool},
                    "tags": [f"federation:{config.federation}", f"site:{site.name}"],
                    "_flow": flow_name,
                }
            )
    document = {
        "name": "fedround",
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": project_dir}}],
        "deployments": [{k: v for k, v in d.items() if k != "_flow"} for d in deployments],
    }
    header = HEADER.format(
        config=config_path,
        federation=config.federation,
        coordinator=config.coordinator_pool,
        cron=config.schedule.cron,
        tz=config.schedule.timezone,
        session=SESSION_DEPLOYMENT,
        evaluation=EVALUATION_DEPLOYMENT,
    )
    return header + yaml.safe_dump(document, sort_keys=False, width=100)


def ensure_work_pools(config: FederationConfig) -> list[str]:
    """Create the coordinator pool and one process pool per site (existing ones are kept)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    pools = [config.coordinator_pool, *(config.work_pool(s.name) for s in config.sites)]
    with get_client(sync_client=True) as client:
        for pool in pools:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    return pools


def deploy(config: FederationConfig, config_path: Path, project_dir: Path, out_dir: Path) -> Path:
    """Create the pools, apply the rendered deployments and create the federation's alert
    automations (:mod:`fedround.tasks.alerts`); returns the prefect.yaml used."""
    if not os.environ.get("PREFECT_API_URL"):
        raise FedroundError(
            "PREFECT_API_URL is not set: deployments need a Prefect server "
            "(start one with `fedround up`, then export what it prints)"
        )
    check_alerts(config)  # undeliverable alerts are refused before anything is created
    relative = os.path.relpath(config_path.resolve(), project_dir.resolve())
    prefect_file = out_dir / config.federation / "prefect.yaml"
    prefect_file.parent.mkdir(parents=True, exist_ok=True)
    prefect_file.write_text(render_prefect_yaml(config, relative))
    ensure_work_pools(config)
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy", "--all"]
    done = subprocess.run(
        [*command, "--prefect-file", str(prefect_file)],
        cwd=project_dir,
        env={**os.environ, PROJECT_DIR_ENV: str(project_dir.resolve())},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise FedroundError(f"prefect deploy failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    ensure_automations(config)
    return prefect_file
