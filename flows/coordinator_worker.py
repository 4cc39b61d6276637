"""The coordinator's worker: Prefect's process worker, for fedround's coordinator flows only.

``fedround coordinator start`` serves the federation's coordinator pool. The flows it runs
hold the coordinator's credentials (the admin object-store key, the MLflow identity), and
Prefect's API has one credential for every client (sites included), so whoever can reach
the API could otherwise put a deployment into this pool and run code as the coordinator.
This worker refuses (marks crashed, with the reason) a flow run unless

- its deployment's entrypoint is one of fedround's coordinator flows (training, promotion,
  rollback), imported from the installed package;
- the deployment's pull steps are none, or only fedround's own ``set_working_directory``
  to this worker's project folder (any other step, a git clone or a shell script, would
  run before the flow);
- neither the deployment nor the flow run sets a job variable that changes what runs or
  where (``command``, ``env``, ``working_dir``: only ``stream_output``, ``labels`` and
  ``name`` are accepted).

What is accepted then runs exactly as under ``prefect worker start --type process``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio.abc
from prefect.client.schemas.objects import FlowRun
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from fedround.tasks.core.errors import FedroundError

from .entrypoints import LIFECYCLE_DEPLOYMENTS, PROJECT_DIR_ENV, TRAINING_ENTRYPOINT

log = logging.getLogger(__name__)

COORDINATOR_ENTRYPOINTS = frozenset(
    {TRAINING_ENTRYPOINT, *(entrypoint for _, entrypoint, _ in LIFECYCLE_DEPLOYMENTS)}
)
SET_WORKING_DIRECTORY = "prefect.deployments.steps.set_working_directory"
HARMLESS_JOB_VARIABLES = frozenset({"stream_output", "labels", "name"})


class RefusedCoordinatorRun(FedroundError):
    """A flow run in the coordinator's pool that is not one of fedround's coordinator flows."""


def project_dir() -> Path:
    """The folder fedround's deployments set as working directory (``FEDROUND_PROJECT_DIR``,
    else this worker's own)."""
    return Path(os.environ.get(PROJECT_DIR_ENV) or os.getcwd()).resolve()


def coordinator_run_problem(
    entrypoint: str | None,
    pull_steps: Sequence[Mapping[str, Any]] | None,
    job_variables: Sequence[Mapping[str, Any] | None],
    project: Path,
) -> str | None:
    """Why a flow run may not run in the coordinator's pool; ``None`` when it may."""
    if entrypoint not in COORDINATOR_ENTRYPOINTS:
        return (
            f"entrypoint {entrypoint!r} is not one of fedround's coordinator flows "
            f"{sorted(COORDINATOR_ENTRYPOINTS)}"
        )
    for step in pull_steps or ():
        if not isinstance(step, Mapping) or list(step) != [SET_WORKING_DIRECTORY]:
            name = list(step) if isinstance(step, Mapping) else type(step).__name__
            return f"pull step {name} is not fedround's set_working_directory"
        arguments = step[SET_WORKING_DIRECTORY]
        directory = arguments.get("directory") if isinstance(arguments, Mapping) else None
        if not isinstance(directory, str) or Path(directory).resolve() != project:
            return f"pull step sets the working directory to {directory!r}, not {str(project)!r}"
    for variables in job_variables:
        unexpected = sorted(set(variables or {}) - HARMLESS_JOB_VARIABLES)
        if unexpected:
            return f"job variables {unexpected} would change what runs or where"
    return None


with warnings.catch_warnings():
    # Registered as Prefect's "process" worker type on purpose: it serves process pools.
    warnings.filterwarnings("ignore", message=".*matches existing registered type")

    class CoordinatorWorker(ProcessWorker):
        """A process worker that runs only fedround's coordinator flows (module docstring)."""

        async def check(self, flow_run: FlowRun) -> None:
            """Raise :class:`RefusedCoordinatorRun` unless the flow run may run here."""
            if flow_run.deployment_id is None:
                raise RefusedCoordinatorRun(
                    f"flow run {flow_run.name!r} has no deployment: the coordinator's worker runs "
                    "only fedround's training, promotion and rollback deployments"
                )
            deployment = await self.client.read_deployment(flow_run.deployment_id)
            problem = coordinator_run_problem(
                deployment.entrypoint,
                deployment.pull_steps,
                [deployment.job_variables, flow_run.job_variables],
                project_dir(),
            )
            if problem is not None:
                log.warning(
                    "refused flow run %s of %s: %s", flow_run.name, deployment.name, problem
                )
                raise RefusedCoordinatorRun(
                    f"deployment {deployment.name!r} refused by the coordinator's worker: {problem}"
                )

        async def run(
            self,
            flow_run: FlowRun,
            configuration: ProcessJobConfiguration,
            task_status: anyio.abc.TaskStatus[int] | None = None,
        ) -> ProcessWorkerResult:
            await self.check(flow_run)  # raises before "started": the run is marked crashed
            return await super().run(flow_run, configuration, task_status)


async def _serve(pool: str, name: str | None) -> None:
    async with CoordinatorWorker(work_pool_name=pool, name=name) as worker:
        await worker.start()


def serve(pool: str, name: str | None = None) -> None:
    """Serve the coordinator's ``pool`` until interrupted."""
    asyncio.run(_serve(pool, name))


if __name__ == "__main__":  # how ``fedround coordinator start`` runs it
    import argparse

    parser = argparse.ArgumentParser(description="Serve a federation's coordinator pool.")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name")
    arguments = parser.parse_args()
    serve(arguments.pool, arguments.name)
