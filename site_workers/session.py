"""The site session: one long-lived Prefect flow run per training run, in the site's pool.

Starting a flow run through a process work pool costs seconds (a fresh Python imports
Prefect, torch and the flow), which would dominate a round that trains for one second.
So the coordinator starts one *session* per site per training run; the site's worker
picks it up from the site's own work pool (placement stays with the pool), and the
session then serves every round of the run with sub-second latency. What a session does
is the round protocol's site side, :class:`~fedround.site_workers.session_protocol.SessionLoop`,
the same code that serves the sites of an embedded federation; here each piece of the
site's work runs as a Prefect task (``round 7 · train``, visible in the UI under this
flow run) and the loop looks at the run pointer every ``poll_s``.

Everything travels through the object store, inside the site's own prefixes.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from fedround.tasks.core import keys
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.object_store import open_store
from fedround.tasks.retry import only_transient
from fedround.tasks.secure_aggregation import SecureStep

from .secure_aggregation import run_secure_step
from .session_protocol import SessionLoop
from .settings import SiteSettings, load_site_settings
from .site_round import (
    EvalSpec,
    RoundSpec,
    SiteRoundResult,
    check_serves,
    run_site_contract,
    run_site_evaluation,
    run_site_round,
)

log = logging.getLogger(__name__)

SITE_CONFIG_ENV = "FEDROUND_SITE_CONFIG"
# The two flows a site serves, as deployments name them (and the site's worker runs).
SESSION_ENTRYPOINT = "fedround.site_workers.session:site_session"
EVALUATION_ENTRYPOINT = "fedround.site_workers.session:site_evaluation"


def site_settings_from_env() -> SiteSettings:
    """The settings of the site this worker serves (``fedround site start`` sets the path)."""
    path = os.environ.get(SITE_CONFIG_ENV)
    if not path:
        raise ConfigError(
            f"{SITE_CONFIG_ENV} is not set: start this site's worker with "
            "`fedround site start --config site.yaml`"
        )
    return load_site_settings(Path(path))


@task(name="data contract", cache_policy=NO_CACHE)
def contract_task(settings: SiteSettings, federation: str, run_id: str) -> ContractReport:
    report = run_site_contract(settings, federation, run_id)
    logger = get_run_logger()
    (logger.info if report.success else logger.warning)(report.summary())
    return report


@task(
    name="train",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 3],
    retry_condition_fn=only_transient,
)
def train_task(settings: SiteSettings, spec: RoundSpec) -> SiteRoundResult:
    return run_site_round(settings, spec)


@task(name="secure aggregation", cache_policy=NO_CACHE)
def secure_step_task(settings: SiteSettings, step: SecureStep) -> int:
    return run_secure_step(settings, step)


class PrefectSiteWork:
    """A site's work as Prefect tasks of the session's flow run."""

    def contract(self, settings: SiteSettings, federation: str, run_id: str) -> ContractReport:
        return contract_task(settings, federation, run_id)

    def train(self, settings: SiteSettings, spec: RoundSpec) -> SiteRoundResult | BaseException:
        named = train_task.with_options(task_run_name=f"round {spec.round} · train")
        future = named.submit(settings, spec)
        future.wait()
        return future.result(raise_on_failure=False)

    def secure(self, settings: SiteSettings, step: SecureStep) -> int | BaseException:
        named = secure_step_task.with_options(
            task_run_name=f"round {step.round} · secure {step.step}"
        )
        future = named.submit(settings, step)
        future.wait()
        return future.result(raise_on_failure=False)


@flow(name="fedround-site-session", flow_run_name="{site} · {run_id} · session {attempt}")
def site_session(
    federation: str,
    run_id: str,
    site: str,
    attempt: int = 1,
    poll_s: float = 0.1,
    heartbeat_s: float = 1.0,
    idle_timeout_s: float = 3600.0,
    dispatch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Serve every round of one training run at this site (see the module docstring).
    ``dispatch`` is the coordinator's seal, checked by the site's worker before the run
    starts (:mod:`.warm_worker`)."""
    settings = site_settings_from_env()
    check_serves(settings, federation, site)
    loop = SessionLoop(
        open_store(settings.object_store),
        federation,
        run_id,
        PrefectSiteWork(),
        poll_s=poll_s,
        heartbeat_s=heartbeat_s,
        idle_timeout_s=idle_timeout_s,
        logger=get_run_logger(),
    )
    info = {
        "flow_run_id": str(runtime.flow_run.id),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    loop.add(settings, attempt, info)
    return loop.run()[site]


@flow(name="fedround-site-evaluation", flow_run_name="{evaluation_id} · {spec[site]}")
def site_evaluation(
    evaluation_id: str, spec: dict[str, Any], dispatch: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate a published model on this site's held-out data; upload the metrics only.
    ``dispatch``: the coordinator's seal, checked by the site's worker (:mod:`.warm_worker`)."""
    settings = site_settings_from_env()
    parsed = EvalSpec.model_validate(spec)
    result = run_site_evaluation(settings, parsed)
    store = open_store(settings.object_store)
    store.put(
        keys.evaluation_result_key(parsed.federation, evaluation_id, parsed.site),
        result.model_dump_json().encode(),
    )
    return result.model_dump(mode="json")
