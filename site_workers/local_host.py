"""A local site host: one process that serves the sessions of many sites on one machine.

The embedded default (and a simulation of many sites) runs its sites in a few of these
processes, spawned by the coordinator's :class:`fedround.flows.local_sites.EmbeddedDispatcher`.
Each host runs the same round protocol as a site's own pool,
:class:`~fedround.site_workers.session_protocol.SessionLoop`, for every site the
coordinator gives it; each site keeps its own ``site.yaml``, data, state folder and
signing key. The host imports torch and the site round once, never Prefect or MLflow;
Great Expectations only when a contract is checked.

Two queues join a host to the coordinator. They carry no results, only wake-ups and
requests; what the sites answer is in the object store, as in distributed mode.

- to the host: ``("serve", federation, run_id, [(site, config_file, attempt), ...])`` adds
  sessions; ``("wake",)`` says the run pointer changed, so the host looks at once instead
  of at its next poll; ``("call", call_id, config_file, spec)`` evaluates a published model
  at a site (promotion, a run's final model); ``("stop",)``.
- from the host: ``("bell", site)`` after it wrote something
  the coordinator waits for; ``("result", call_id, value, error)``; ``("served", index,
  run_id, outcomes)`` when its sessions of a run end.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.errors import ObjectStoreError
from fedround.tasks.object_store import ObjectStore, open_store
from fedround.tasks.secure_aggregation import SecureStep

from .settings import SiteSettings, load_site_settings
from .site_round import RoundSpec, SiteRoundResult

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    from .session_protocol import SessionLoop

log = logging.getLogger(__name__)

IDLE_CHECK_S = 1.0  # how often an idle host checks that its coordinator is still alive
RETRY_DELAYS_S = (1.0, 3.0)  # object-store trouble while training: as the pool's train task


@lru_cache(maxsize=4096)
def site_settings(config_file: str) -> SiteSettings:
    return load_site_settings(Path(config_file))


_stores: dict[tuple[str, str], ObjectStore] = {}


def site_store(settings: SiteSettings) -> ObjectStore:
    """The site's own store client (one per identity, shared by the sites that have it)."""
    secret = settings.object_store.secret_key
    identity = (
        settings.object_store.model_dump_json(),
        secret.get_secret_value() if secret else "",
    )
    if identity not in _stores:
        _stores[identity] = open_store(settings.object_store)
    return _stores[identity]


class PlainSiteWork:
    """A site's work as plain calls in this process."""

    def contract(self, settings: SiteSettings, federation: str, run_id: str) -> ContractReport:
        from .site_round import run_site_contract

        report = run_site_contract(settings, federation, run_id)
        (log.info if report.success else log.warning)(report.summary())
        return report

    def train(self, settings: SiteSettings, spec: RoundSpec) -> SiteRoundResult | BaseException:
        from .site_round import run_site_round

        for delay in (*RETRY_DELAYS_S, None):
            try:
                return run_site_round(settings, spec)
            except ObjectStoreError as exc:
                if delay is None:
                    return exc
                log.warning("site %s: round %d: %s; retrying", spec.site, spec.round, exc)
                time.sleep(delay)
            except Exception as exc:  # the site's failure, reported as its round's error
                return exc
        raise AssertionError("unreachable")

    def secure(self, settings: SiteSettings, step: SecureStep) -> int | BaseException:
        from .secure_aggregation import run_secure_step

        try:
            return run_secure_step(settings, step)
        except Exception as exc:
            return exc


class _Stop(Exception):
    """The coordinator asked the host to stop, or is gone."""


class SiteHost:
    """The host's side of the two queues (see the module docstring)."""

    def __init__(self, index: int, inbox: Queue[Any], outbox: Queue[Any], parent: int) -> None:
        self.index, self.inbox, self.outbox, self.parent = index, inbox, outbox, parent
        self.later: collections.deque[tuple[Any, ...]] = collections.deque()
        self.loop: SessionLoop | None = None

    def _next(self, timeout: float) -> tuple[Any, ...] | None:
        if self.later:
            return self.later.popleft()
        if os.getppid() != self.parent:
            raise _Stop
        try:
            return tuple(self.inbox.get(timeout=timeout))
        except Exception:  # queue.Empty
            return None

    def main(self) -> None:
        try:
            while True:
                message = self._next(IDLE_CHECK_S)
                if message is not None:
                    self._handle(message)
        except _Stop:
            return

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stop":
            raise _Stop
        if kind == "call":
            self._call(*message[1:])
        elif kind == "serve":
            if self.loop is not None and self.loop.run_id != message[2]:
                self.later.append(message)  # another run: after this one
                return
            if self.loop is None:
                self._serve(*message[1:])
            else:
                self._add(message[3])
        # "wake" while idle: nothing to look at

    def _call(self, call_id: int, config_file: str, spec: Any) -> None:
        from .site_round import run_site_evaluation

        try:
            value, error = run_site_evaluation(site_settings(config_file), spec), None
        except Exception as exc:  # the caller classifies it, as a pool worker's failure
            value, error = None, exc
        try:
            self.outbox.put(("result", call_id, value, error))
        except Exception:  # an exception that does not pickle
            self.outbox.put(("result", call_id, None, RuntimeError(f"{error!r}")))

    def _add(self, sessions: list[tuple[str, str, int]]) -> None:
        assert self.loop is not None
        for _site, config_file, attempt in sessions:
            settings = site_settings(config_file)
            info = {"host": f"local-{self.index}", "pid": os.getpid()}
            self.loop.add(settings, attempt, info, site_store(settings))

    def _wait(self, timeout: float) -> None:
        """Between looks at the run pointer: take the coordinator's messages, and return
        at a wake-up, a new session or a request (or after ``timeout``)."""
        message = self._next(timeout)
        if message is not None and message[0] != "wake":
            self._handle(message)

    def _serve(self, federation: str, run_id: str, sessions: list[tuple[str, str, int]]) -> None:
        from .session_protocol import SessionLoop

        first = site_settings(sessions[0][1])
        self.loop = SessionLoop(
            site_store(first),
            federation,
            run_id,
            PlainSiteWork(),
            wait=self._wait,
            notify=lambda site: self.outbox.put(("bell", site)),
            poll_s=0.5,
            heartbeat_s=heartbeat_interval(len(sessions)),
        )
        self._add(sessions)
        try:
            outcomes = self.loop.run()
        finally:
            self.loop = None
        self.outbox.put(("served", self.index, run_id, outcomes))


def heartbeat_interval(sites: int) -> float:
    """One beat a second, slower when one process beats for hundreds of sites (each beat
    is a write): at most about 200 writes a second, never slower than a beat in 3 s
    (a site is thought dead after ``selection.liveness_s``, 10 s by default)."""
    return min(3.0, max(1.0, sites / 200))


def host_main(index: int, inbox: Queue[Any], outbox: Queue[Any], parent: int) -> None:
    """A host process's entry point: imports first, then serve until told to stop."""
    import torch

    from . import site_round  # noqa: F401

    torch.set_num_threads(1)
    # torch's first optimizer imports its compiler stack (seconds): not in the first round
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    # Great Expectations' import (seconds) meanwhile, not in the run's set-up
    threading.Thread(target=_import_contracts, name="fedround-import", daemon=True).start()
    SiteHost(index, inbox, outbox, parent).main()


def _import_contracts() -> None:
    from . import contract

    contract.import_great_expectations()
