"""The site session: one long-lived Prefect flow run per training run, in the site's pool.

Starting a flow run through a process work pool costs seconds (a fresh Python imports
Prefect, torch and the flow), which would dominate a round that trains for one second.
So the coordinator starts one *session* per site per training run; the site's worker
picks it up from the site's own work pool (placement stays with the pool), and the
session then serves every round of the run with sub-second latency:

1. check the site's data contract; upload only the report;
2. bump a heartbeat object every second (so the coordinator notices a dead site fast);
3. poll the run's pointer (``current.json``) every ``poll_s``; when it assigns this site
   a round it has not served (sync: each round that selects it; ``mode: async``: each
   global version it is sent), run it as a Prefect task (``round 7 · train``, visible in the UI
   under this flow run) and upload the update, or an ``error.json`` if it failed;
4. stop when the run finishes or fails, when a newer session of this site supersedes
   this one, or after ``idle_timeout_s`` without a new round.

Everything travels through the object store, inside the site's own prefixes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from fedround.tasks.core import keys
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.errors import ConfigError, ObjectNotFound
from fedround.tasks.object_store import ObjectStore, open_store
from fedround.tasks.retry import only_transient
from fedround.tasks.secure_aggregation import SecureStep, step_error_key

from .secure_aggregation import run_secure_step
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


def read_json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(store.get(key)))
    except ObjectNotFound:
        return None


class Heartbeat:
    """Bumps a counter in the session's heartbeat object every ``interval`` seconds."""

    def __init__(self, store: ObjectStore, key: str, info: dict[str, Any], interval: float) -> None:
        self.store, self.key, self.info, self.interval = store, key, info, interval
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedround-heartbeat", daemon=True)

    def _beat(self) -> None:
        self.beats += 1
        body = {**self.info, "beat": self.beats, "at": datetime.now(UTC).isoformat()}
        try:
            self.store.put(self.key, json.dumps(body).encode())
        except Exception as exc:  # a missed beat is not fatal; the next one may succeed
            log.warning("heartbeat failed: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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


def _superseded(store: ObjectStore, federation: str, run_id: str, site: str, attempt: int) -> bool:
    prefix = keys.site_run_prefix(federation, run_id, site) + "sessions/"
    attempts = [int(Path(key).stem) for key in store.list(prefix) if key.endswith(".json")]
    return bool(attempts) and max(attempts) > attempt


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
    logger = get_run_logger()
    settings = site_settings_from_env()
    check_serves(settings, federation, site)
    store = open_store(settings.object_store)
    info = {
        "attempt": attempt,
        "flow_run_id": str(runtime.flow_run.id),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    served: list[int] = []
    beat_key = keys.session_key(federation, run_id, site, attempt)
    with Heartbeat(store, beat_key, info, heartbeat_s):
        report = contract_task(settings, federation, run_id)
        store.put(
            keys.contract_report_key(federation, run_id, site), report.model_dump_json().encode()
        )
        if not report.success:
            return {"site": site, "contract": "failed", "rounds": served}
        attempted: set[tuple[int, str]] = set()
        answered: set[SecureStep] = set()
        idle_since = time.monotonic()
        next_check = 0.0
        while True:
            pointer = read_json(store, keys.run_pointer_key(federation, run_id)) or {}
            if pointer.get("state") in {"finished", "failed"}:
                logger.info("run %s is %s: session ends", run_id, pointer["state"])
                break
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 2.0
                if _superseded(store, federation, run_id, site, attempt):
                    logger.info("a newer session of %s took over: session %d ends", site, attempt)
                    break
            step = _secure_step(pointer, federation, run_id, site)
            if step is not None and step not in answered:
                answered.add(step)
                idle_since = time.monotonic()
                _serve_secure_step(store, settings, step)
            assignment = _assignment(pointer, site)
            if assignment is not None and assignment not in attempted:
                attempted.add(assignment)
                idle_since = time.monotonic()
                _serve_round(store, settings, federation, run_id, *assignment, served)
            elif time.monotonic() - idle_since > idle_timeout_s:
                logger.warning("no new round for %.0f s: session ends", idle_timeout_s)
                break
            time.sleep(poll_s)
    return {"site": site, "contract": "passed", "rounds": served}


def _assignment(pointer: dict[str, Any], site: str) -> tuple[int, str] | None:
    """The (round, nonce) the run pointer assigns to ``site``, if any."""
    entry = pointer.get("assigned", {})
    at = entry.get(site) if isinstance(entry, dict) else None
    if not isinstance(at, list) or len(at) != 2:
        return None
    round_, nonce = at
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
        return None
    return round_, str(nonce)


def _secure_step(
    pointer: dict[str, Any], federation: str, run_id: str, site: str
) -> SecureStep | None:
    """The secure-aggregation step the run pointer asks of ``site``, if any."""
    body = pointer.get("secure")
    if not isinstance(body, dict) or site not in (body.get("sites") or []):
        return None
    try:
        return SecureStep(
            federation=federation,
            run_id=run_id,
            round=body["round"],
            site=site,
            nonce=str(body["nonce"]),
            step=body["step"],
        )
    except (KeyError, ValueError):
        return None


@task(name="secure aggregation", cache_policy=NO_CACHE)
def secure_step_task(settings: SiteSettings, step: SecureStep) -> int:
    return run_secure_step(settings, step)


def _serve_secure_step(store: ObjectStore, settings: SiteSettings, step: SecureStep) -> None:
    future = secure_step_task.with_options(
        task_run_name=f"round {step.round} · secure {step.step}"
    ).submit(settings, step)
    future.wait()
    outcome = future.result(raise_on_failure=False)
    if isinstance(outcome, int):
        return
    error = {"round": step.round, "nonce": step.nonce, "step": step.step}
    error["error"] = f"{type(outcome).__name__}: {outcome}"
    key = step_error_key(step.federation, step.run_id, step.round, step.site, step.step)
    store.put(key, json.dumps(error).encode())


def _serve_round(
    store: ObjectStore,
    settings: SiteSettings,
    federation: str,
    run_id: str,
    round_: int,
    nonce: str,
    served: list[int],
) -> None:
    plan = read_json(store, keys.round_plan_key(federation, run_id, round_)) or {}
    raw = plan.get("specs", {}).get(settings.site)
    if plan.get("nonce") != nonce or raw is None:
        return  # not selected this round (or the plan was replaced meanwhile)
    deadline = float(plan.get("deadline_epoch", 0))
    if deadline and time.time() > deadline:
        return
    spec = RoundSpec.model_validate(raw)
    future = train_task.with_options(task_run_name=f"round {round_} · train").submit(settings, spec)
    future.wait()
    outcome = future.result(raise_on_failure=False)
    if isinstance(outcome, SiteRoundResult):
        served.append(round_)
        return
    error = {"round": round_, "nonce": nonce, "error": f"{type(outcome).__name__}: {outcome}"}
    store.put(
        keys.round_error_key(federation, run_id, round_, settings.site), json.dumps(error).encode()
    )


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
