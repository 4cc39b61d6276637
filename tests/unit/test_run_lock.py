"""Lease renewal, breaking a lock, and the run lock (one coordinator per run), on the
local backend. The S3 path of the same compare-and-swap is in
tests/integration/test_lifecycle_s3.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedround.tasks.core import keys
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.locks import (
    Lock,
    LockHeld,
    LockLost,
    _boot_id,
    break_lock,
    holder_gone,
    read_lock,
)
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.run_lock import (
    RunLease,
    RunLocked,
    check_run_lease,
    hold_run_lock,
    lease_seconds,
)

pytestmark = pytest.mark.security("two-coordinators")


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def _expires(store: LocalObjectStore, key: str) -> datetime:
    return datetime.fromisoformat(json.loads(store.get(key))["expires_at"])


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_renew_extends_the_lease_and_fails_once_the_lock_was_taken_over(
    store: LocalObjectStore,
) -> None:
    # Prepare
    lock = Lock(store, "f/locks/r.json", ttl_s=30, holder="alice@a").acquire()
    before = _expires(store, "f/locks/r.json")
    time.sleep(0.01)

    # Execute
    lock.renew()

    # Assert: later lease, still hers, same token
    assert _expires(store, "f/locks/r.json") > before
    lock.verify()
    assert lock.info["token"] == json.loads(store.get("f/locks/r.json"))["token"]

    # her lease runs out and bob takes over: her renewal must not resurrect it
    info = json.loads(store.get("f/locks/r.json"))
    info["expires_at"] = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    info["host"] = "elsewhere"
    store.put("f/locks/r.json", json.dumps(info).encode())
    bob = Lock(store, "f/locks/r.json", ttl_s=30, holder="bob@b").acquire()
    assert bob.took_over is not None
    bob_body = store.get("f/locks/r.json")
    with pytest.raises(LockLost):
        lock.renew()
    assert store.get("f/locks/r.json") == bob_body


def test_a_second_coordinator_on_a_live_run_is_refused_naming_the_holder(
    store: LocalObjectStore,
) -> None:
    with hold_run_lock(store, "fed", "run-1"):
        with pytest.raises(RunLocked) as refused:
            RunLease(store, "fed", "run-1", holder="bob@other").acquire()
        message = str(refused.value)
        assert "run run-1 of federation fed is already running" in message
        assert f"on host {socket.gethostname()}" in message
        assert f"pid {os.getpid()}" in message
        assert "lease until 20" in message
        assert "fedround lock break fed run-run-1 --reason" in message
        assert "\n" not in message
        # another run id of the same federation is independent
        RunLease(store, "fed", "run-2").acquire().release()
    assert not store.exists(keys.lock_key("fed", "run-run-1"))  # released at the end


def test_the_run_lock_is_released_when_the_run_fails(store: LocalObjectStore) -> None:
    with pytest.raises(RuntimeError), hold_run_lock(store, "fed", "boom"):
        raise RuntimeError("round 3 failed")
    RunLease(store, "fed", "boom").acquire().release()  # free again


def test_the_lease_is_renewed_in_the_background_while_the_run_lives(
    store: LocalObjectStore,
) -> None:
    lease = RunLease(store, "fed", "long", ttl_s=0.6).acquire()
    try:
        time.sleep(1.5)  # 2.5 leases
        lease.check()
        with pytest.raises(RunLocked):
            RunLease(store, "fed", "long", holder="bob@b").acquire()
    finally:
        lease.release()


def test_a_crashed_coordinators_expired_lease_is_taken_over_by_a_resume(
    store: LocalObjectStore,
) -> None:
    # a coordinator on another machine died; its lease ran out
    key = keys.lock_key("fed", "run-crashed")
    past = datetime.now(UTC) - timedelta(seconds=5)
    stale = {"holder": "ops@host-a", "host": "host-a", "pid": 4242, "token": "x"}
    store.put(key, json.dumps({**stale, "expires_at": past.isoformat()}).encode())

    with hold_run_lock(store, "fed", "crashed") as lease:
        assert lease.lock.took_over is not None
        assert lease.lock.took_over["holder"] == "ops@host-a"
        assert lease.lock.took_over["taken_over_because"] == "its lease ran out"


def test_a_live_lease_of_another_host_is_not_taken_over(store: LocalObjectStore) -> None:
    key = keys.lock_key("fed", "run-remote")
    future = datetime.now(UTC) + timedelta(seconds=60)
    other = {"holder": "ops@host-b", "host": "host-b", "pid": _dead_pid(), "token": "y"}
    store.put(key, json.dumps({**other, "expires_at": future.isoformat()}).encode())
    with pytest.raises(RunLocked, match="ops@host-b on host host-b"):
        RunLease(store, "fed", "remote").acquire()


@pytest.mark.skipif(_boot_id() is None, reason="needs a Linux boot id")
def test_a_killed_coordinator_on_this_host_is_taken_over_without_waiting(
    store: LocalObjectStore,
) -> None:
    key = keys.lock_key("fed", "run-killed")
    future = datetime.now(UTC) + timedelta(seconds=600)
    dead = {
        "holder": "me@here",
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": _dead_pid(),
        "token": "z",
        "expires_at": future.isoformat(),
    }
    assert holder_gone(dead)
    assert not holder_gone({**dead, "pid": os.getpid()})  # alive (and ourselves)
    assert not holder_gone({**dead, "boot_id": "another-boot"})
    store.put(key, json.dumps(dead).encode())

    with hold_run_lock(store, "fed", "killed") as lease:
        assert lease.lock.took_over is not None
        assert lease.lock.took_over["taken_over_because"] == "its process is gone"


def test_a_holder_that_lost_its_lease_stops_before_the_checkpoint(
    store: LocalObjectStore,
) -> None:
    check_run_lease("fed", "not-held-here")  # a process without the lease: no check
    with hold_run_lock(store, "fed", "lost"):
        check_run_lease("fed", "lost")
        break_lock(store, keys.lock_key("fed", "run-lost"), "coordinator hung")
        with pytest.raises(LockLost, match="nothing was written"):
            check_run_lease("fed", "lost")


@pytest.mark.security("stale-lock")
def test_breaking_a_lock_needs_a_reason_and_frees_it_for_the_next_holder(
    store: LocalObjectStore,
) -> None:
    key = "fed/locks/promotion-m.json"
    crashed = Lock(store, key, ttl_s=3600, holder="alice@a", purpose="promote m v3").acquire()
    with pytest.raises(FedroundError, match="needs a reason"):
        break_lock(store, key, "  ")
    assert store.get(key) == crashed._body  # untouched

    broken = break_lock(store, key, "alice's promotion crashed (pod evicted)")

    assert broken["holder"] == "alice@a" and broken["purpose"] == "promote m v3"
    assert (read_lock(store, key) or {}).get("broken") is True
    with pytest.raises(FedroundError, match="already broken"):
        break_lock(store, key, "again")
    with pytest.raises(LockLost):
        crashed.verify()  # the old holder, if it wakes up, writes nothing
    rollback = Lock(store, key, ttl_s=60, holder="bob@b").acquire()
    assert rollback.took_over is None  # a tombstone is nobody's lock
    with pytest.raises(FedroundError, match="nothing to break"):
        break_lock(store, "fed/locks/none.json", "why not")


@pytest.mark.security("stale-lock")
def test_breaking_a_lock_that_changed_meanwhile_is_refused(
    store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "fed/locks/promotion-m.json"
    Lock(store, key, ttl_s=3600, holder="alice@a").acquire()
    real_replace = store.replace

    def renewed_in_between(k: str, data: bytes, expected: bytes) -> bool:
        store.put(k, expected + b" ")  # the holder renewed just now
        return real_replace(k, data, expected)

    monkeypatch.setattr(store, "replace", renewed_in_between)
    with pytest.raises(LockHeld, match="changed while breaking it"):
        break_lock(store, key, "looked dead")


@pytest.mark.parametrize("value", ["1", "abc", "nan", "inf", "-5"])
def test_the_lease_length_is_checked(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDROUND_RUN_LEASE_S", value)
    with pytest.raises(FedroundError, match="FEDROUND_RUN_LEASE_S"):
        lease_seconds()
    monkeypatch.setenv("FEDROUND_RUN_LEASE_S", "30")
    assert lease_seconds() == 30.0
