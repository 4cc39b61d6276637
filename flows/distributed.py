"""The distributed dispatcher: site work runs in each site's own Prefect work pool.

At the start of a training run the coordinator asks every site's pool for one *site
session* (``run_deployment`` of ``fedround-site-session/<pool>`` with an idempotency key
run/site/attempt, linked as a sub-flow run of the coordinator). A Prefect worker at the
site picks it up, with the site's data and credentials, and the session serves all of
the run's rounds (see :mod:`fedround.site_workers.session`). Rounds are then dispatched
through small objects in the object store: the coordinator writes the round's plan and
moves the run pointer; each session uploads its update into its own prefix. This keeps
the per-round orchestration cost well under a second while every round and every site's
work stays visible in the Prefect UI and the pools decide where site work runs.

Liveness: a session bumps a heartbeat counter every second; a site whose counter stops
moving for ``liveness_s`` is left out of the open round at once (not at the deadline),
and gets a fresh session for later rounds when its pool has a live worker again. A site
whose pool has no worker heartbeat is skipped before dispatch.

Heartbeat versions: in a versioned bucket every beat keeps the previous body as a
noncurrent version (measured on SeaweedFS 4.48: 50 beats, 50 versions; at 1 Hz about
86,400 per site and day). SeaweedFS 4.48 accepts a ``NoncurrentVersionExpiration``
lifecycle rule and reads it back, but applies it only from a separate lifecycle worker, at
a granularity of days, which no test here can observe; a lifecycle rule is also limited to
a key prefix, and the heartbeats lie under each site's own prefix. So the coordinator
deletes the noncurrent versions of every session's heartbeat itself (S3 ``DeleteObjects``
with version ids, which SeaweedFS and MinIO both honour): every ``TRIM_VERSIONS_EVERY_S``
while the run lasts and for every session when the run closes, bounding the pile to about
five minutes of beats per site. Production MinIO adds a lifecycle rule for the
federation's ``updates/`` prefix as a second line (``deployments/minio/init.sh``).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from fedround.flows.dispatch import SiteFailed, SiteUnavailable
from fedround.flows.dispatch_key import load_dispatch_key, publish_dispatch_key
from fedround.site_workers.session import EVALUATION_ENTRYPOINT, SESSION_ENTRYPOINT
from fedround.site_workers.site_round import EvalSpec, RoundSpec, SiteEvalResult, SiteRoundResult
from fedround.tasks.core import keys
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.dispatch_seal import seal_parameters
from fedround.tasks.core.errors import ObjectNotFound, ObjectTooLarge
from fedround.tasks.core.limits import (
    CONTRACT_REPORT_MAX_BYTES,
    EVALUATION_RESULT_MAX_BYTES,
    SESSION_STATE_MAX_BYTES,
    SITE_ERROR_MAX_BYTES,
    UPDATE_MANIFEST_MAX_BYTES,
)
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.signing import SigningKey
from fedround.tasks.object_store import ObjectStore
from fedround.tasks.secure_aggregation import SecureStep, manifest_key, step_error_key

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", ContractReport, SiteEvalResult)

SESSION_DEPLOYMENT = "fedround-site-session"
TRIM_VERSIONS_EVERY_S = 300.0  # how often a live session's old heartbeat versions go
EVALUATION_DEPLOYMENT = "fedround-site-evaluation"


def deployment_name(flow_name: str, pool: str) -> str:
    """Deployments are named after the pool they target: ``<flow>/<pool>``."""
    return f"{flow_name}/{pool}"


@dataclass
class _Session:
    attempt: int = 0
    flow_run_id: str | None = None
    last_beat: int = -1
    last_change: float = 0.0  # coordinator monotonic time the counter last moved
    started_at: float = 0.0
    trimmed_at: float = 0.0  # when its heartbeat's old versions were last deleted


@dataclass
class DistributedDispatcher:
    """Reaches sites through their work pools and the object store."""

    config: FederationConfig
    store: ObjectStore
    poll_s: float = 0.1
    liveness_s: float | None = None  # default: the config's selection.liveness_s
    join_timeout_s: float | None = None  # default: the config's selection.join_timeout_s
    worker_stale_s: float = 20.0
    run_id: str = ""
    sessions: dict[str, _Session] = field(default_factory=dict)
    down: dict[str, str] = field(default_factory=dict)
    # Sites whose session wrote a heartbeat the coordinator cannot use, and why.
    malformed: dict[str, str] = field(default_factory=dict)
    # The open plans by round, and each site's latest assignment (round, nonce): in
    # ``mode: async`` sites join a version's plan one at a time.
    plans: dict[int, dict[str, Any]] = field(default_factory=dict)
    assigned: dict[str, tuple[int, str]] = field(default_factory=dict)
    # The run pointer last written, without a secure-aggregation step (steps add one).
    pointer: dict[str, Any] = field(default_factory=dict)
    # The tenant's dispatch key: it seals every flow run sent to a site (loaded, and its
    # public half published for the sites, at the first dispatch).
    dispatch_key: SigningKey | None = None
    _published: bool = field(default=False, init=False, repr=False)

    def sealed(self, parameters: dict[str, Any], entrypoint: str, pool: str) -> dict[str, Any]:
        """``parameters`` sealed for a run of ``entrypoint`` in ``pool``
        (:mod:`fedround.tasks.core.dispatch_seal`)."""
        if self.dispatch_key is None:
            self.dispatch_key = load_dispatch_key(self.config.tenant)
        if not self._published:
            publish_dispatch_key(
                self.store, self.config.federation, self.config.tenant, self.dispatch_key
            )
            self._published = True
        return seal_parameters(parameters, self.dispatch_key, entrypoint=entrypoint, pool=pool)

    # --- pools and sessions -------------------------------------------------------------

    def pool_problem(self, site: str) -> str | None:
        """Why the site's pool cannot take work now, or ``None`` when a worker is live."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound as PrefectNotFound

        pool = self.config.work_pool(site)
        with get_client(sync_client=True) as client:
            try:
                client.read_work_pool(pool)
            except PrefectNotFound:
                return f"work pool {pool!r} does not exist (run `fedround deploy`)"
            workers = client.read_workers_for_work_pool(pool)
        now = datetime.now(UTC)
        live = [
            w
            for w in workers
            if w.last_heartbeat_time
            and now - w.last_heartbeat_time < timedelta(seconds=self.worker_stale_s)
        ]
        if not live:
            return f"work pool {pool!r} has no worker online (start it: `fedround site start`)"
        return None

    def _start_session(self, site: str) -> None:
        session = self.sessions.setdefault(site, _Session())
        # Continue after any session this run already had (a resumed coordinator, a
        # restarted site): the newer attempt supersedes older ones, which then stop.
        prefix = keys.site_run_prefix(self.config.federation, self.run_id, site) + "sessions/"
        names = [k.rsplit("/", 1)[-1].split(".")[0] for k in self.store.list(prefix)]
        earlier = [int(n) for n in names if n.isdigit() and len(n) < 10]  # a site writes these
        session.attempt = max([session.attempt, *earlier]) + 1
        self.malformed.pop(site, None)
        self._launch(site, session)
        session.last_beat = -1
        session.started_at = time.monotonic()

    def _launch(self, site: str, session: _Session) -> None:
        """Ask the site's pool for session ``session.attempt`` of this run."""
        from prefect.deployments import run_deployment

        pool = self.config.work_pool(site)
        parameters = {
            "federation": self.config.federation,
            "run_id": self.run_id,
            "site": site,
            "attempt": session.attempt,
        }
        flow_run: Any = run_deployment(
            deployment_name(SESSION_DEPLOYMENT, pool),
            parameters=self.sealed(parameters, SESSION_ENTRYPOINT, pool),
            timeout=0,
            idempotency_key=f"{self.run_id}/{site}/{session.attempt}",
        )
        session.flow_run_id = str(flow_run.id)
        log.info("site %s: session %d requested in pool %s", site, session.attempt, pool)

    def _ensure_sessions(self, sites: Iterable[str]) -> None:
        """Start a session for every site that has none alive and a live pool."""
        for site in sites:
            session = self.sessions.get(site)
            if session and session.attempt and self._alive_or_joining(site):
                continue
            problem = self.pool_problem(site)
            if problem:
                self.down[site] = problem
                continue
            self.down.pop(site, None)
            self._start_session(site)

    def _beat(self, site: str) -> int | None:
        session = self.sessions[site]
        key = keys.session_key(self.config.federation, self.run_id, site, session.attempt)
        try:
            body = json.loads(self.store.get(key, max_bytes=SESSION_STATE_MAX_BYTES))
            beat = body.get("beat") if isinstance(body, dict) else None
            if not isinstance(beat, int) or isinstance(beat, bool):
                raise ValueError(f"'beat' is {str(beat)[:40]!r}, not a whole number")
            return beat
        except ObjectNotFound:
            return None
        except (ObjectTooLarge, ValueError) as exc:  # a site wrote it: never trusted
            if site not in self.malformed:
                log.warning("site %s: unusable session heartbeat: %s", site, exc)
            self.malformed[site] = f"its session heartbeat is unusable ({exc})"
            return None

    def _alive_or_joining(self, site: str) -> bool:
        """True while the session beats, or has not started yet but may still join."""
        session = self.sessions[site]
        beat = self._beat(site)
        if site in self.malformed:
            return False
        now = time.monotonic()
        if beat is None:
            join = self.join_timeout_s or self.config.selection.join_timeout_s
            return now - session.started_at < join
        if beat != session.last_beat:
            session.last_beat, session.last_change = beat, now
        if now - session.trimmed_at >= TRIM_VERSIONS_EVERY_S:
            session.trimmed_at = now
            self._trim(keys.session_key(self.config.federation, self.run_id, site, session.attempt))
        liveness = self.liveness_s or self.config.selection.liveness_s
        return now - session.last_change < liveness

    def _get(self, key: str, max_bytes: int) -> bytes | None:
        """A site-written object, read with a size limit; ``None`` while it is absent."""
        try:
            return self.store.get(key, max_bytes=max_bytes)
        except ObjectNotFound:
            return None
        except ObjectTooLarge as exc:
            raise SiteUnavailable(str(exc)) from exc

    def _poll(
        self, site: str, what: str, timeout: float, probe: Callable[[], T | None], watch: bool
    ) -> T:
        """Call ``probe`` every ``poll_s`` until it returns something; fail at the deadline,
        or at once when ``watch`` is set and the site's session stops beating."""
        deadline = time.monotonic() + timeout
        next_liveness = 0.0
        while True:
            found = probe()
            if found is not None:
                return found
            now = time.monotonic()
            if now >= deadline:
                raise SiteUnavailable(f"site {site} missed the {timeout:.0f}s deadline for {what}")
            if watch and now >= next_liveness:
                next_liveness = now + 0.5
                if not self._alive_or_joining(site):
                    if site in self.malformed:
                        raise SiteUnavailable(f"site {site}: {self.malformed[site]}")
                    raise SiteUnavailable(f"site {site}'s session stopped answering during {what}")
            self._wait_for(site, min(self.poll_s, max(0.0, deadline - now)))

    def _wait_for(self, site: str, timeout: float) -> None:
        """Pause between two looks at what ``site`` wrote (on one machine the site's
        host rings when it wrote something, see :mod:`fedround.flows.local_sites`)."""
        time.sleep(timeout)

    def _await_object(
        self,
        site: str,
        what: str,
        name: str,
        timeout: float,
        key: str,
        max_bytes: int,
        model: type[M],
        watch: bool,
    ) -> M:
        """Wait for a site-written JSON object at ``key`` (see :meth:`_poll`), read within its
        size limit and parsed as ``model``; a malformed one leaves the site out."""
        payload = self._poll(site, what, timeout, lambda: self._get(key, max_bytes), watch)
        try:
            return model.model_validate_json(payload)
        except ValueError as exc:
            raise SiteUnavailable(f"site {site}: its {name} is malformed: {exc}") from exc

    # --- the dispatcher protocol --------------------------------------------------------

    def open_run(self, run_id: str, sites: list[str]) -> None:
        self.run_id = run_id
        self._put_pointer({"state": "running", "round": 0, "nonce": ""})
        self._ensure_sessions(sites)

    def check_contract(
        self, site: str, federation: str, run_id: str, timeout: float
    ) -> ContractReport:
        if site in self.down:
            raise SiteUnavailable(f"site {site}: {self.down[site]}")
        key = keys.contract_report_key(federation, run_id, site)
        return self._await_object(
            site,
            "its data contract",
            "contract report",
            timeout,
            key,
            CONTRACT_REPORT_MAX_BYTES,
            ContractReport,
            watch=True,
        )

    def announce_round(
        self, round_: int, nonce: str, specs: list[RoundSpec], deadline: float
    ) -> list[str]:
        """Publish the round's plan and open it; returns the sites skipped as down.

        Announcing the same round and nonce again adds sites to its plan (``mode: async``
        sends a version to each site as it becomes idle). The run pointer lists every
        site's latest assignment, which a session serves once."""
        self._ensure_sessions(spec.site for spec in specs)
        plan = self.plans.get(round_)
        if plan is None or plan["nonce"] != nonce:
            plan = {"round": round_, "nonce": nonce, "deadline_epoch": deadline, "specs": {}}
            self.plans[round_] = plan
            for old in [r for r in self.plans if r < round_ - 10]:
                del self.plans[old]
        plan["deadline_epoch"] = max(plan["deadline_epoch"], deadline)
        for spec in specs:
            if spec.site not in self.down:
                plan["specs"][spec.site] = spec.model_dump(mode="json")
                self.assigned[spec.site] = (round_, nonce)
        federation = self.config.federation
        self.store.put(
            keys.round_plan_key(federation, self.run_id, round_), json.dumps(plan).encode()
        )
        self._put_pointer(
            {
                "state": "running",
                "round": round_,
                "nonce": nonce,
                "assigned": {site: list(at) for site, at in self.assigned.items()},
            }
        )
        return sorted(s.site for s in specs if s.site in self.down)

    def run_round(self, spec: RoundSpec, timeout: float) -> SiteRoundResult:
        if spec.site in self.down:
            raise SiteUnavailable(f"site {spec.site}: {self.down[spec.site]}")
        started = time.monotonic()
        federation, run_id, round_, site = spec.federation, spec.run_id, spec.round, spec.site
        manifest_key = keys.update_manifest_key(federation, run_id, round_, site)
        error_key = keys.round_error_key(federation, run_id, round_, site)

        def probe() -> tuple[bytes, UpdateManifest | None] | None:
            raw = self._get(manifest_key, UPDATE_MANIFEST_MAX_BYTES)
            if raw is not None:
                try:
                    manifest = UpdateManifest.from_json(raw)
                except ValueError:
                    return raw, None  # malformed: aggregation rejects it, with its reason
                if manifest.nonce == spec.nonce:
                    return raw, manifest
            error = self._error(error_key, spec.nonce)
            if error:
                raise SiteFailed(error)
            return None

        raw, manifest = self._poll(site, f"round {round_}", timeout, probe, watch=True)
        return SiteRoundResult(
            site=site,
            round=round_,
            ok=True,
            num_examples=manifest.num_examples if manifest else 0,
            update_key=keys.update_key(federation, run_id, round_, site),
            manifest_key=manifest_key,
            nbytes_up=(manifest.nbytes if manifest else 0) + len(raw),
            nbytes_down=_count(manifest.metrics.get("bytes_down")) if manifest else 0,
            metrics=manifest.metrics if manifest else {},
            seconds=time.monotonic() - started,
        )

    def _error(self, key: str, nonce: str) -> str | None:
        try:
            body = json.loads(self.store.get(key, max_bytes=SITE_ERROR_MAX_BYTES))
        except ObjectNotFound:
            return None
        except (ObjectTooLarge, ValueError) as exc:
            return f"its error object is unusable ({exc})"
        if not isinstance(body, dict):
            return "its error object is unusable (not a JSON object)"
        return str(body.get("error"))[:2000] if body.get("nonce") == nonce else None

    def evaluate(self, spec: EvalSpec, timeout: float) -> SiteEvalResult:
        from prefect.deployments import run_deployment

        problem = self.pool_problem(spec.site)
        if problem:
            raise SiteUnavailable(f"site {spec.site}: {problem}")
        # One result per evaluation and model: <evaluation id>-<label> (candidate, production).
        _, evaluation, model_file = spec.model_key.rsplit("/", 2)
        evaluation_id = f"{evaluation}-{model_file.removesuffix('.safetensors')}"
        pool = self.config.work_pool(spec.site)
        parameters = {"evaluation_id": evaluation_id, "spec": spec.model_dump(mode="json")}
        run_deployment(
            deployment_name(EVALUATION_DEPLOYMENT, pool),
            parameters=self.sealed(parameters, EVALUATION_ENTRYPOINT, pool),
            timeout=0,
            idempotency_key=f"{evaluation_id}/{spec.site}/{spec.model_key}",
        )
        key = keys.evaluation_result_key(spec.federation, evaluation_id, spec.site)
        return self._await_object(
            spec.site,
            "its evaluation",
            "evaluation result",
            timeout,
            key,
            EVALUATION_RESULT_MAX_BYTES,
            SiteEvalResult,
            watch=False,
        )

    def close_run(self, state: str) -> None:
        if self.run_id:
            self._put_pointer({"state": state})
            for site in self.sessions:  # every attempt's heartbeat, old versions and all
                prefix = keys.site_run_prefix(self.config.federation, self.run_id, site)
                try:
                    beats = self.store.list(prefix + "sessions/")
                except Exception as exc:
                    log.warning("site %s: could not list its session heartbeats: %s", site, exc)
                    continue
                for key in beats:
                    self._trim(key)

    def _trim(self, key: str) -> None:
        """Delete a heartbeat's old versions; a failure is only a warning (next time)."""
        try:
            removed = self.store.trim_versions(key)
        except Exception as exc:
            log.warning("could not delete the old versions of %s: %s", key, exc)
            return
        if removed:
            log.debug("deleted %d old versions of %s", removed, key)

    def close(self) -> None:
        """Nothing to release: sessions end by themselves when the run is closed."""

    def secure_steps(self, steps: list[SecureStep], timeout: float) -> dict[str, str | None]:
        """Name the step and its sites in the run pointer; each site's session answers it
        once. Waits (:meth:`_poll`, one site after the other against one deadline: the
        sites work at the same time) for every site's signed message or its error
        object; a site whose session stops beating drops out at once."""
        if not steps:
            return {}
        first = steps[0]
        self._put_pointer(
            {
                **self.pointer,
                "secure": {
                    "round": first.round,
                    "nonce": first.nonce,
                    "step": first.step,
                    "sites": [step.site for step in steps],
                },
            }
        )
        deadline = time.monotonic() + timeout
        outcomes: dict[str, str | None] = {}
        for step in steps:
            what = f"the secure {step.step} step"
            left = max(0.0, deadline - time.monotonic())
            try:
                self._poll(step.site, what, left, functools.partial(self._step_answer, step), True)
                outcomes[step.site] = None
            except SiteUnavailable as exc:
                outcomes[step.site] = str(exc)
        return outcomes

    def _step_answer(self, step: SecureStep) -> bool | None:
        """True once the site's message for ``step`` is there (the secure aggregation reads
        and verifies it, a malformed one included); :class:`SiteUnavailable` when the site
        wrote why it failed the step; None while neither is there."""
        federation, run_id, round_, site = step.federation, step.run_id, step.round, step.site
        raw = self._get(
            manifest_key(federation, run_id, round_, site, step.step), UPDATE_MANIFEST_MAX_BYTES
        )
        if raw is not None:
            try:
                if UpdateManifest.from_json(raw).nonce == step.nonce:
                    return True
            except ValueError:
                return True  # malformed: the secure aggregation rejects it, saying why
        error = self._error(step_error_key(federation, run_id, round_, site, step.step), step.nonce)
        if error:
            raise SiteUnavailable(f"site {site} failed {step.step}: {error}")
        return None

    def _put_pointer(self, body: dict[str, Any]) -> None:
        key = keys.run_pointer_key(self.config.federation, self.run_id)
        self.pointer = {k: v for k, v in body.items() if k != "secure"}
        self.store.put(key, json.dumps(body).encode())


def _count(value: object) -> int:
    """A byte count a site reported: a finite, non-negative number, else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(value) if 0 <= value < 2**53 else 0
