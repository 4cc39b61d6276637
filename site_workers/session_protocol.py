"""The site side of the round protocol, one implementation for both runtimes.

A *session* serves one site through one training run. It checks the site's data
contract and uploads the report, keeps a heartbeat counter moving, and answers what the
run pointer (``current.json``, written by the coordinator) asks of the site: a round to
train (sync: each round that selects it; ``mode: async``: each global version it is
sent) or a secure-aggregation step. It stops when the run finishes or fails, when a newer
session of the site supersedes it, or after ``idle_timeout_s`` without new work.

:class:`SessionLoop` runs any number of sessions in one process: one in a site's own
pool (:func:`fedround.site_workers.session.site_session`, where the site's work runs as
Prefect tasks), every site of an embedded or simulated federation spread over a few
local processes (:mod:`fedround.site_workers.local_host`, plain calls). What differs is
only :class:`SiteWork` (how a piece of site work is run) and how the loop waits between
looks at the pointer. Everything travels through the object store, inside the site's own
prefixes; nothing here imports Prefect.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from fedround.tasks.core import keys
from fedround.tasks.core.contract_report import ContractReport, RuleResult
from fedround.tasks.core.errors import FedroundError, ObjectNotFound
from fedround.tasks.object_store import ObjectStore
from fedround.tasks.secure_aggregation import SecureStep, step_error_key

from .settings import SiteSettings
from .site_round import RoundSpec, SiteRoundResult

log = logging.getLogger(__name__)

SUPERSEDED_CHECK_S = 2.0  # how often a session looks for a newer session of its site


class SiteWork(Protocol):
    """How a session runs a piece of the site's work. ``train`` and ``secure`` return
    the failure instead of raising it: a failed round is reported, not fatal."""

    def contract(self, settings: SiteSettings, federation: str, run_id: str) -> ContractReport: ...

    def train(self, settings: SiteSettings, spec: RoundSpec) -> SiteRoundResult | BaseException: ...

    def secure(self, settings: SiteSettings, step: SecureStep) -> int | BaseException: ...


def read_json(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        body = json.loads(store.get(key))
    except ObjectNotFound:
        return None
    return body if isinstance(body, dict) else None


class Heartbeat:
    """Bumps a counter in each session's heartbeat object every ``interval`` seconds
    (one thread for all the sessions of a process)."""

    def __init__(self, store: ObjectStore, interval: float) -> None:
        self.store, self.interval = store, interval
        self.beats = 0
        self._bodies: dict[str, tuple[ObjectStore, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedround-heartbeat", daemon=True)

    def add(self, key: str, info: dict[str, Any], store: ObjectStore | None = None) -> None:
        """Beat for ``key`` too (written through ``store``: each site its own identity)."""
        with self._lock:
            self._bodies[key] = (store or self.store, info)
        self._put(store or self.store, key, info)

    def remove(self, key: str) -> None:
        with self._lock:
            self._bodies.pop(key, None)

    def _put(self, store: ObjectStore, key: str, info: dict[str, Any]) -> None:
        body = {**info, "beat": self.beats, "at": datetime.now(UTC).isoformat()}
        try:
            store.put(key, json.dumps(body).encode())
        except Exception as exc:  # a missed beat is not fatal; the next one may succeed
            log.warning("heartbeat %s failed: %s", key, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beats += 1
            with self._lock:
                bodies = list(self._bodies.items())
            for key, (store, info) in bodies:
                if self._stop.is_set():
                    return
                self._put(store, key, info)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Session:
    """One site's session in this process, and what it has served."""

    settings: SiteSettings
    attempt: int
    store: ObjectStore  # the site's own identity: everything it writes goes through it
    contract: str = "pending"  # then "passed" or "failed"
    rows: int = 0  # from its contract report: larger sites are served first
    attempted: set[tuple[int, str]] = field(default_factory=set)
    answered: set[SecureStep] = field(default_factory=set)
    served: list[int] = field(default_factory=list)
    ended: str | None = None  # why it stopped serving
    next_check: float = 0.0

    @property
    def site(self) -> str:
        return self.settings.site

    def outcome(self) -> dict[str, Any]:
        return {"site": self.site, "contract": self.contract, "rounds": self.served}


class SessionLoop:
    """Serves the sessions of one training run in this process (see the module doc).

    ``wait(timeout)`` is how the loop pauses between looks at the run pointer: a sleep in
    a site's pool, a wake-up from the coordinator on one machine. ``notify(site)`` is
    called after the loop wrote something the coordinator waits for."""

    def __init__(
        self,
        store: ObjectStore,
        federation: str,
        run_id: str,
        work: SiteWork,
        *,
        wait: Callable[[float], None] = time.sleep,
        notify: Callable[[str], None] = lambda site: None,
        poll_s: float = 0.1,
        heartbeat_s: float = 1.0,
        idle_timeout_s: float = 3600.0,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
    ) -> None:
        self.store, self.federation, self.run_id, self.work = store, federation, run_id, work
        self.wait, self.notify, self.poll_s = wait, notify, poll_s
        self.idle_timeout_s, self.log = idle_timeout_s, logger
        self.heartbeat = Heartbeat(store, heartbeat_s)
        self.sessions: dict[str, Session] = {}
        self.ended: str | None = None
        self._plans: dict[int, dict[str, Any]] = {}

    def add(
        self,
        settings: SiteSettings,
        attempt: int,
        info: dict[str, Any],
        store: ObjectStore | None = None,
    ) -> Session:
        """Start serving a site (a newer attempt replaces this process's older one): its
        heartbeat starts at once, its data contract is checked on the loop's next turn.
        ``store``: the site's own (default: the loop's)."""
        old = self.sessions.get(settings.site)
        if old is not None:
            self.heartbeat.remove(self._beat_key(old))
        session = Session(settings=settings, attempt=attempt, store=store or self.store)
        self.sessions[settings.site] = session
        self.heartbeat.add(self._beat_key(session), {"attempt": attempt, **info}, session.store)
        return session

    def _beat_key(self, session: Session) -> str:
        return keys.session_key(self.federation, self.run_id, session.site, session.attempt)

    def _end(self, session: Session, why: str) -> None:
        session.ended = why
        self.heartbeat.remove(self._beat_key(session))
        self.log.info("site %s: session %d ends: %s", session.site, session.attempt, why)

    def active(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.ended is None]

    def run(self) -> dict[str, dict[str, Any]]:
        """Serve until the run ends, every session has ended, or nothing came for
        ``idle_timeout_s``; returns each site's outcome."""
        pointer_key = keys.run_pointer_key(self.federation, self.run_id)
        with self.heartbeat:
            idle_since = time.monotonic()
            while self.active():
                self._check_contracts()
                pointer = read_json(self.store, pointer_key) or {}
                if pointer.get("state") in {"finished", "failed"}:
                    self.ended = f"run {self.run_id} is {pointer['state']}"
                    break
                self._check_superseded()
                if not self.active():
                    break
                if self._serve(pointer):
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.idle_timeout_s:
                    self.ended = f"no new round for {self.idle_timeout_s:.0f} s"
                    break
                else:
                    self.wait(self.poll_s)
        if self.ended:
            self.log.info("sessions end: %s", self.ended)
        return {site: session.outcome() for site, session in self.sessions.items()}

    def _check_contracts(self) -> None:
        for session in self.active():
            if session.contract != "pending":
                continue
            try:
                report = self.work.contract(session.settings, self.federation, self.run_id)
            except Exception as exc:  # reported as a failed contract; the other sites go on
                self.log.warning("site %s: its data contract check failed: %s", session.site, exc)
                error = RuleResult(
                    rule="contract_check", success=False, error=f"{type(exc).__name__}: {exc}"
                )
                report = ContractReport(
                    site=session.site, suite="?", success=False, row_count=0, results=[error]
                )
            session.rows = report.row_count
            session.store.put(
                keys.contract_report_key(self.federation, self.run_id, session.site),
                report.model_dump_json().encode(),
            )
            self.notify(session.site)
            session.contract = "passed" if report.success else "failed"
            if not report.success:
                self._end(session, "its data contract failed")

    def _check_superseded(self) -> None:
        """At most one listing per turn, each session's every ``SUPERSEDED_CHECK_S``."""
        now = time.monotonic()
        due = [s for s in self.active() if s.next_check <= now]
        if not due:
            return
        session = min(due, key=lambda s: s.next_check)
        session.next_check = now + SUPERSEDED_CHECK_S
        prefix = keys.site_run_prefix(self.federation, self.run_id, session.site) + "sessions/"
        attempts = [
            int(Path(key).stem)
            for key in session.store.list(prefix)
            if key.endswith(".json") and Path(key).stem.isdigit()
        ]
        if attempts and max(attempts) > session.attempt:
            self._end(session, "a newer session of the site took over")

    def _serve(self, pointer: dict[str, Any]) -> bool:
        """Answer what the pointer asks of each session; True when anything was new."""
        served = False
        secure = [
            (session, step)
            for session in self.active()
            if (step := secure_step(pointer, self.federation, self.run_id, session.site))
            and step not in session.answered
        ]
        for session, step in secure:
            session.answered.add(step)
            self._serve_secure_step(session, step)
            served = True
        rounds = [
            (session, at)
            for session in self.active()
            if (at := assignment(pointer, session.site)) and at not in session.attempted
        ]
        # Largest sites first: where sites share a process, it keeps the round short.
        for session, at in sorted(rounds, key=lambda pair: -pair[0].rows):
            session.attempted.add(at)
            self._serve_round(session, *at)
            served = True
        return served

    def _serve_secure_step(self, session: Session, step: SecureStep) -> None:
        outcome = self.work.secure(session.settings, step)
        if isinstance(outcome, BaseException):
            error = {"round": step.round, "nonce": step.nonce, "step": step.step}
            error["error"] = describe(outcome)
            key = step_error_key(self.federation, self.run_id, step.round, step.site, step.step)
            session.store.put(key, json.dumps(error).encode())
        self.notify(session.site)

    def _plan(self, round_: int, nonce: str, site: str) -> dict[str, Any] | None:
        """The round's plan, read once for all the sites of this process that it names
        (again when it changed: ``mode: async`` adds sites to a version's plan)."""
        plan = self._plans.get(round_)
        if plan is None or plan.get("nonce") != nonce or site not in plan.get("specs", {}):
            plan = read_json(self.store, keys.round_plan_key(self.federation, self.run_id, round_))
            if plan is None or not isinstance(plan.get("specs"), dict):
                return None
            self._plans = {r: p for r, p in self._plans.items() if r > round_ - 3}
            self._plans[round_] = plan
        return plan

    def _serve_round(self, session: Session, round_: int, nonce: str) -> None:
        plan = self._plan(round_, nonce, session.site)
        raw = (plan or {}).get("specs", {}).get(session.site)
        if plan is None or plan.get("nonce") != nonce or raw is None:
            return  # not selected this round (or the plan was replaced meanwhile)
        deadline = float(plan.get("deadline_epoch", 0))
        if deadline and time.time() > deadline:
            return
        outcome = self.work.train(session.settings, RoundSpec.model_validate(raw))
        if isinstance(outcome, SiteRoundResult):
            session.served.append(round_)
        else:
            error = {"round": round_, "nonce": nonce, "error": describe(outcome)}
            session.store.put(
                keys.round_error_key(self.federation, self.run_id, round_, session.site),
                json.dumps(error).encode(),
            )
        self.notify(session.site)


def describe(error: BaseException) -> str:
    """A failure as the coordinator reports it: fedround's own errors say what went wrong
    (a user's function, a digest, a refusal) by themselves; others are named by type."""
    if isinstance(error, FedroundError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def assignment(pointer: dict[str, Any], site: str) -> tuple[int, str] | None:
    """The (round, nonce) the run pointer assigns to ``site``, if any."""
    entry = pointer.get("assigned", {})
    at = entry.get(site) if isinstance(entry, dict) else None
    if not isinstance(at, list) or len(at) != 2:
        return None
    round_, nonce = at
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
        return None
    return round_, str(nonce)


def secure_step(
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
