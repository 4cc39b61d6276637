"""One coordinator per training run: a lease on the run id in the object store.

A training run holds ``<federation>/locks/run-<run_id>.json`` (a
:class:`~fedround.tasks.locks.Lock`) from before it writes anything until it ends,
finished or failed. A background thread renews the lease every third of its length
(compare-and-swap on the lock's own object), so a live coordinator keeps it, and a
crashed one's lease runs out after at most ``FEDROUND_RUN_LEASE_S`` seconds (default
120), when a resume (``fedround run --run-id``) takes it over. A coordinator killed and
restarted on the same machine takes over at once (the lock names its host and process,
:func:`~fedround.tasks.locks.holder_gone`). A second coordinator on the same run id fails
at once, naming the holder, its host and its lease. Before each checkpoint the holder
checks that it still holds the lease (:func:`check_run_lease`): one that lost it (a
renewal that could not reach the store for a whole lease, a ``fedround lock break``)
stops before it writes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedround.tasks.core import keys
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.locks import Lock, LockHeld, LockLost, default_holder, read_lock
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)

LEASE_ENV = "FEDROUND_RUN_LEASE_S"
DEFAULT_LEASE_S = 120.0


class RunLocked(LockHeld):
    """Another coordinator is running this run id."""


def run_lock_name(run_id: str) -> str:
    return f"run-{run_id}"


def lease_seconds() -> float:
    """The run lease's length: ``FEDROUND_RUN_LEASE_S`` (at least 3 s), else 120 s."""
    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 3.0 or value == float("inf"):
        raise ConfigError(f"{LEASE_ENV}={raw!r}: give a number of seconds, at least 3")
    return value


class RunLease:
    """The lease of one training run, renewed in the background while it is held."""

    def __init__(
        self,
        store: ObjectStore,
        federation: str,
        run_id: str,
        ttl_s: float | None = None,
        holder: str | None = None,
    ) -> None:
        self.federation = federation
        self.run_id = run_id
        self.lock = Lock(
            store,
            keys.lock_key(federation, run_lock_name(run_id)),
            ttl_s=ttl_s if ttl_s is not None else lease_seconds(),
            holder=holder or default_holder(),
            purpose=f"coordinator of run {run_id} (pid {os.getpid()})",
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: LockLost | None = None

    def acquire(self) -> RunLease:
        """Take the lease (or take over an expired one); :class:`RunLocked` if it is live."""
        lock = self.lock
        if not lock.try_acquire():
            info = _current(lock)
            until = info.get("expires_at", "?")
            raise RunLocked(
                f"run {self.run_id} of federation {self.federation} is already running: its "
                f"coordinator {info.get('holder', '?')} on host {info.get('host', '?')} (pid "
                f"{info.get('pid', '?')}) holds the run lock {lock.store.uri(lock.key)}, "
                f"lease until {until}. Wait for that run to finish or stop it; if its "
                f"coordinator is gone, resume with --run-id {self.run_id} after {until}, or "
                f"free it now with `fedround lock break {self.federation} "
                f"{run_lock_name(self.run_id)} --reason TEXT`"
            )
        if lock.took_over is not None:
            log.warning(
                "run %s: took over the lease of %s (%s; lease until %s): resuming",
                self.run_id,
                lock.took_over.get("holder"),
                lock.took_over.get("taken_over_because"),
                lock.took_over.get("expires_at"),
            )
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"fedround-run-lease-{self.run_id}", daemon=True
        )
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        every = self.lock.ttl_s / 3
        while not self._stop.wait(every):
            try:
                self.lock.renew()
            except LockLost as exc:
                log.error("run %s: %s", self.run_id, exc)
                self._lost = exc
                return
            except Exception as exc:  # the store is unreachable: try again next time
                log.warning("run %s: could not renew the run lease: %s", self.run_id, exc)

    def check(self) -> None:
        """Raise :class:`LockLost` unless this coordinator still holds the run's lease."""
        if self._lost is not None:
            raise self._lost
        self.lock.verify()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.lock.release()
        except Exception as exc:  # it expires on its own
            log.warning("run %s: could not release the run lease: %s", self.run_id, exc)


def _current(lock: Lock) -> dict[str, object]:
    return read_lock(lock.store, lock.key) or {"holder": "?", "purpose": "released just now"}


# The leases this process holds, by (federation, run id): the checkpoint task finds its
# run's lease here (tasks run in threads of the flow's process).
_held: dict[tuple[str, str], RunLease] = {}
_held_mutex = threading.Lock()


@contextmanager
def hold_run_lock(store: ObjectStore, federation: str, run_id: str) -> Iterator[RunLease]:
    """Hold the run's lease for the ``with`` block; released on any exit."""
    lease = RunLease(store, federation, run_id).acquire()
    with _held_mutex:
        _held[(federation, run_id)] = lease
    try:
        yield lease
    finally:
        with _held_mutex:
            _held.pop((federation, run_id), None)
        lease.release()


def check_run_lease(federation: str, run_id: str) -> None:
    """Before a checkpoint: :class:`LockLost` if this process held the run's lease and
    lost it. A process that holds none (a tool writing checkpoints directly) passes."""
    with _held_mutex:
        lease = _held.get((federation, run_id))
    if lease is not None:
        lease.check()
