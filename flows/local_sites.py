"""The embedded dispatcher: a whole federation's sites in a few local processes.

The embedded default and the simulation of many sites run the same round protocol as
distributed mode (:class:`fedround.flows.distributed.DistributedDispatcher`: a session per
site per run, the round's plan and the run pointer in the store, updates and errors in
each site's own prefix, heartbeats, late rejection, resume). Only the transport differs:

- a site's session is not a flow run in its work pool but a session in one of
  ``processes`` local site hosts (:mod:`fedround.site_workers.local_host`), spawned once
  and kept for the command; the sites are spread over them, each keeping its own config,
  data, state folder and signing key;
- both sides still poll the store, but each also rings the other when it wrote something
  (the coordinator after moving the run pointer, a host after a site uploaded its update,
  error, contract report or secure-aggregation message), so neither waits a poll interval;
- a host that exits is started again when its sites are next needed; its sites' sessions
  stop beating and are left out of the open round, as a dead site worker's are;
- a published model is evaluated by the site's host directly (a site's pool runs a
  separate evaluation flow for it).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedround.flows.dispatch import SiteUnavailable
from fedround.flows.distributed import DistributedDispatcher, _Session
from fedround.site_workers.site_round import EvalSpec, SiteEvalResult
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)

FALLBACK_POLL_S = 0.25  # the store is still polled, in case a ring is lost


@dataclass
class _Host:
    index: int
    process: Any  # multiprocessing.Process (spawn context)
    inbox: Any  # multiprocessing.Queue


class EmbeddedDispatcher(DistributedDispatcher):
    """Sites served by local site hosts through the store (see the module docstring)."""

    def __init__(
        self,
        config: FederationConfig,
        store: ObjectStore,
        site_configs: Mapping[str, Path],
        processes: int,
    ) -> None:
        super().__init__(config=config, store=store, poll_s=FALLBACK_POLL_S)
        self.site_configs = {site: str(path) for site, path in site_configs.items()}
        self.processes = max(1, min(processes, len(site_configs)))
        self.slots = {site: i % self.processes for i, site in enumerate(sorted(site_configs))}
        self._context = multiprocessing.get_context("spawn")
        self._outbox: Any = self._context.Queue()
        self._bells: dict[str, threading.Event] = {}
        self._calls: dict[int, Future[SiteEvalResult]] = {}
        self._call_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._starting: dict[int, list[tuple[str, str, int]]] = {}
        self.hosts = [self._spawn(index) for index in range(self.processes)]
        self._listener = threading.Thread(
            target=self._listen, name="fedround-site-hosts", daemon=True
        )
        self._listener.start()

    # --- hosts ----------------------------------------------------------------------------

    def _spawn(self, index: int) -> _Host:
        from fedround.site_workers.local_host import host_main

        inbox: Any = self._context.Queue()
        process = self._context.Process(
            target=host_main,
            args=(index, inbox, self._outbox, os.getpid()),
            name=f"fedround-site-host-{index}",
            daemon=True,
        )
        process.start()
        return _Host(index=index, process=process, inbox=inbox)

    def _listen(self) -> None:
        while True:
            try:
                message = self._outbox.get()
            except (EOFError, OSError):
                return
            if message is None:
                return
            kind = message[0]
            if kind == "bell":
                self._bell(message[1])
            elif kind == "result":
                _, call_id, value, error = message
                with self._lock:
                    future = self._calls.pop(call_id, None)
                if future is not None:
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(value)
            elif kind == "served":
                log.debug("site host %d: sessions of run %s ended", message[1], message[2])

    def _event(self, site: str) -> threading.Event:
        with self._lock:
            return self._bells.setdefault(site, threading.Event())

    def _bell(self, site: str) -> None:
        self._event(site).set()

    def _wait_for(self, site: str, timeout: float) -> None:
        event = self._event(site)
        event.wait(timeout)
        event.clear()

    def _host(self, site: str) -> _Host:
        try:
            return self.hosts[self.slots[site]]
        except KeyError:
            raise SiteUnavailable(
                f"site {site!r} has no config in this embedded federation"
            ) from None

    def _send(self, host: _Host, message: tuple[Any, ...]) -> None:
        try:
            host.inbox.put(message)
        except (OSError, ValueError) as exc:  # a closed queue: the host is being replaced
            log.warning("site host %d: could not send %s: %s", host.index, message[0], exc)

    # --- the session transport --------------------------------------------------------------

    def pool_problem(self, site: str) -> str | None:
        """``None`` once the site's host runs (a host that exited is started again)."""
        host = self._host(site)
        if not host.process.is_alive():
            log.warning(
                "site host %d exited (code %s): starting it again",
                host.index,
                host.process.exitcode,
            )
            self.hosts[host.index] = self._spawn(host.index)
        return None

    def _launch(self, site: str, session: _Session) -> None:
        self._starting.setdefault(self.slots[site], []).append(
            (site, self.site_configs[site], session.attempt)
        )

    def _ensure_sessions(self, sites: Iterable[str]) -> None:
        super()._ensure_sessions(sites)
        starting, self._starting = self._starting, {}
        for slot, sessions in starting.items():
            self._send(self.hosts[slot], ("serve", self.config.federation, self.run_id, sessions))
            log.info("site host %d: sessions for %s", slot, ", ".join(s[0] for s in sessions))

    def _alive_or_joining(self, site: str) -> bool:
        host = self._host(site)
        if not host.process.is_alive():
            return False
        return super()._alive_or_joining(site)

    def _put_pointer(self, body: dict[str, Any]) -> None:
        super()._put_pointer(body)
        for host in self.hosts:
            self._send(host, ("wake",))

    # --- evaluation of a published model ------------------------------------------------

    def evaluate(self, spec: EvalSpec, timeout: float) -> SiteEvalResult:
        self.pool_problem(spec.site)  # a host that exited is started again
        host = self._host(spec.site)
        future: Future[SiteEvalResult] = Future()
        call_id = next(self._call_ids)
        with self._lock:
            self._calls[call_id] = future
        self._send(host, ("call", call_id, self.site_configs[spec.site], spec))
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                if not host.process.is_alive():
                    raise SiteUnavailable(
                        f"site {spec.site}: its local site host exited during its evaluation"
                    ) from None
                if time.monotonic() >= deadline:
                    with self._lock:
                        self._calls.pop(call_id, None)
                    raise SiteUnavailable(
                        f"site {spec.site} missed the {timeout:.0f}s deadline for its evaluation"
                    ) from None

    def close(self) -> None:
        """Stop the hosts (they keep nothing that outlives the command)."""
        for host in self.hosts:
            self._send(host, ("stop",))
        for host in self.hosts:
            host.process.join(timeout=3)
            if host.process.is_alive():
                host.process.terminate()
                host.process.join(timeout=5)
        self._outbox.put(None)
        self._listener.join(timeout=5)
