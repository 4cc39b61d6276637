"""The site's worker: a Prefect worker that runs fedround's site flows in its own, warm
interpreter, and nothing else.

Prefect's process worker starts a fresh Python for every flow run (through a workspace
supervisor): on a 2-core site that is 5-10 s of imports (Prefect, torch, Great
Expectations, fedround) before a site session can check its data, and ten sites starting
at once took 46-63 s. This worker polls the site's pool, claims runs and reports their
states exactly like the process worker (it is one, with its own ``run``), but executes
each flow run in a thread of this process, whose imports were done when the worker
started. Sessions of several training runs (and promotion's evaluations) run side by side.

It runs only the two flows a site serves, and only when its federation's coordinator sent
them: a flow run whose deployment's entrypoint is not fedround's site session or site
evaluation, or whose parameters carry no valid, unused coordinator seal
(:mod:`fedround.tasks.core.dispatch_seal`), is refused (marked crashed with the reason).
So neither a deployment that someone else put in this site's pool nor a run of the site's
own deployments created by anyone but the coordinator runs here with the site's data and
credentials.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from typing import Any

import anyio
import anyio.abc
from prefect.client.schemas.objects import FlowRun
from prefect.flow_engine import run_flow
from prefect.flows import Flow
from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, temporary_settings
from prefect.workers.process import (
    ProcessJobConfiguration,
    ProcessWorker,
    ProcessWorkerResult,
)

from fedround.tasks.core.dispatch_seal import DispatchRefused
from fedround.tasks.core.errors import ConfigError, FedroundError

from .dispatch_check import check_dispatch, used_seals
from .session import (
    EVALUATION_ENTRYPOINT,
    SESSION_ENTRYPOINT,
    site_evaluation,
    site_session,
    site_settings_from_env,
)

log = logging.getLogger(__name__)

SITE_FLOWS: dict[str, Flow[Any, Any]] = {
    SESSION_ENTRYPOINT: site_session,
    EVALUATION_ENTRYPOINT: site_evaluation,
}


class RefusedFlowRun(FedroundError):
    """A flow run in the site's pool that is not one of fedround's site flows, or that its
    federation's coordinator did not seal."""


def check_seal(flow_run: FlowRun, entrypoint: str) -> None:
    """:class:`RefusedFlowRun` unless the run carries a valid, unused coordinator seal
    (:mod:`.dispatch_check`) for this site's pool."""
    try:
        settings = site_settings_from_env()
        check_dispatch(settings, flow_run.parameters, entrypoint, used_seals(settings))
    except (DispatchRefused, ConfigError) as exc:
        raise RefusedFlowRun(f"flow run {flow_run.name!r} refused: {exc}") from exc


def warm_up() -> None:
    """Do the imports a site session needs now, not when the first run arrives."""
    import great_expectations  # noqa: F401
    import torch

    import fedround.site_workers.site_round  # noqa: F401

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))


class WarmUp:
    """:func:`warm_up` in a background thread, so that the worker registers with its pool
    while the imports run (ten workers on two cores registered in 121.5 s when each
    imported first, against 59.4 s for Prefect's process worker); a flow run waits for it."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="site-warm-up", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            warm_up()
        except BaseException as exc:  # re-raised in the run that needs it
            self._error = exc
        finally:
            self._done.set()

    def wait(self) -> None:
        """Block until the imports are done; re-raise what stopped them."""
        self._done.wait()
        if self._error is not None:
            raise RefusedFlowRun(
                f"the site's imports failed at worker start: {self._error!r}"
            ) from self._error


_WARM = WarmUp()


class SiteWorker(ProcessWorker):
    """A process worker whose flow runs execute in this process (see the module docstring)."""

    async def site_flow(self, flow_run: FlowRun) -> Flow[Any, Any]:
        """The site flow this run is for; :class:`RefusedFlowRun` for anything else."""
        if flow_run.deployment_id is None:
            raise RefusedFlowRun(
                f"flow run {flow_run.name!r} has no deployment: this site's worker runs "
                "only fedround's site session and evaluation deployments"
            )
        deployment = await self.client.read_deployment(flow_run.deployment_id)
        flow = SITE_FLOWS.get(deployment.entrypoint or "")
        if flow is None:
            raise RefusedFlowRun(
                f"deployment {deployment.name!r} runs {deployment.entrypoint!r}: this site's "
                f"worker runs only {sorted(SITE_FLOWS)}"
            )
        entrypoint = deployment.entrypoint or ""
        await anyio.to_thread.run_sync(check_seal, flow_run, entrypoint)
        return flow

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        flow = await self.site_flow(flow_run)  # raises before "started": marked crashed
        await anyio.to_thread.run_sync(_WARM.wait)  # imports still running? wait for them
        if task_status is not None:
            task_status.started(os.getpid())
        execute = functools.partial(
            run_flow,
            flow,
            flow_run=flow_run,
            parameters=dict(flow_run.parameters),
            return_type="state",
        )
        state: Any = await anyio.to_thread.run_sync(execute, abandon_on_cancel=True)
        log.info("flow run %s ended %s", flow_run.name, getattr(state, "type", state))
        return ProcessWorkerResult(identifier=str(os.getpid()), status_code=0)


async def _serve(pool: str, name: str) -> None:
    async with SiteWorker(
        work_pool_name=pool,
        name=name,
        prefetch_seconds=5,
        heartbeat_interval_seconds=5,  # the coordinator sees a dead site's pool within ~20 s
    ) as worker:
        await worker.start()


def serve(pool: str, name: str) -> None:
    """Serve ``pool`` until interrupted (polling for new runs every second), warming up
    beside the registration."""
    _WARM.start()
    with temporary_settings(updates={PREFECT_WORKER_QUERY_SECONDS: 1}):
        asyncio.run(_serve(pool, name))


if __name__ == "__main__":  # how ``fedround site start`` runs it, environment set first
    import argparse

    parser = argparse.ArgumentParser(description="Serve one site's Prefect work pool.")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    arguments = parser.parse_args()
    serve(arguments.pool, arguments.name)
