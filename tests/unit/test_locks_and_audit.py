"""Conditional writes, single-writer locks and the append-only audit log (local backend).

The same behaviour on the real S3 server is tested in tests/integration/test_lifecycle_s3.py.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedround.tasks.audit import AuditLog
from fedround.tasks.locks import Lock, LockHeld, LockLost
from fedround.tasks.object_store import LocalObjectStore


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def test_create_and_replace_are_conditional(store: LocalObjectStore) -> None:
    assert store.create("f/locks/a.json", b"one")
    assert not store.create("f/locks/a.json", b"two")
    assert store.get("f/locks/a.json") == b"one"
    assert not store.replace("f/locks/a.json", b"three", expected=b"two")
    assert store.replace("f/locks/a.json", b"three", expected=b"one")
    assert store.get("f/locks/a.json") == b"three"
    assert not store.replace("f/locks/missing.json", b"x", expected=b"")
    assert store.list("f/") == ["f/locks/a.json"]  # no temp or guard files listed


def _race(root: str, key: str, barrier: multiprocessing.synchronize.Barrier) -> bool:  # type: ignore[name-defined]
    lock = Lock(LocalObjectStore(Path(root)), key, ttl_s=60, holder="racer")
    barrier.wait()
    return lock.try_acquire()


def test_exactly_one_of_many_processes_gets_the_lock(store: LocalObjectStore) -> None:
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        for trial in range(5):
            barrier = manager.Barrier(6)
            with context.Pool(6) as pool:
                wins = pool.starmap(
                    _race, [(str(store.root), f"f/locks/t{trial}.json", barrier)] * 6
                )
            assert sum(wins) == 1, wins


def test_lock_held_names_the_holder_and_expired_lock_is_taken_over(
    store: LocalObjectStore,
) -> None:
    first = Lock(store, "f/locks/p.json", ttl_s=60, holder="alice@a", purpose="promote v2")
    first.acquire()
    with pytest.raises(LockHeld, match=r"held by alice@a \(promote v2\)"):
        Lock(store, "f/locks/p.json", ttl_s=60, holder="bob@b").acquire()

    # alice's process dies; her lease runs out
    info = json.loads(store.get("f/locks/p.json"))
    info["expires_at"] = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    store.put("f/locks/p.json", json.dumps(info).encode())
    second = Lock(store, "f/locks/p.json", ttl_s=60, holder="bob@b").acquire()
    assert second.took_over is not None and second.took_over["holder"] == "alice@a"
    with pytest.raises(LockLost):
        first.verify()  # alice must not write under a lock she lost
    second.verify()
    first.release()  # not hers any more: leaves bob's lock alone
    assert store.exists("f/locks/p.json")
    second.release()
    assert not store.exists("f/locks/p.json")


def test_audit_log_appends_and_chains(store: LocalObjectStore) -> None:
    audit = AuditLog(store, "f")
    audit.append("promote", "m", version="1", reason="first production", actor="alice")
    audit.append("reject", "m", version="2", reason="failed global_gain", actor="bob")
    entries = audit.entries()
    assert [(e.sequence, e.action, e.actor) for e in entries] == [
        (1, "promote", "alice"),
        (2, "reject", "bob"),
    ]
    assert audit.entries(version="2")[0].reason == "failed global_gain"
    assert audit.verify() == []
    lines = audit.to_jsonl().splitlines()
    assert json.loads(lines[1])["previous_sha256"] is not None

    # editing an entry breaks the chain
    key = store.list("f/audit/")[0]
    store.put(key, store.get(key).replace(b"alice", b"mallory"))
    assert audit.verify() == ["entry 2 does not chain to the entry before it"]


def test_concurrent_appends_get_distinct_sequence_numbers(store: LocalObjectStore) -> None:
    audit = AuditLog(store, "f")
    with ThreadPoolExecutor(8) as pool:
        entries = list(pool.map(lambda i: audit.append("reject", "m", version=str(i)), range(24)))
    assert sorted(e.sequence for e in entries) == list(range(1, 25))
    assert len(audit.entries()) == 24
