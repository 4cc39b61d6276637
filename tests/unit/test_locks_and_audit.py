"""Conditional writes, single-writer locks and the append-only audit log (local backend).

The same behaviour on the real S3 server is tested in tests/integration/test_lifecycle_s3.py.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedround.flows.cli.main import app
from fedround.tasks.audit import AuditEntry, AuditHead, AuditLog
from fedround.tasks.core import keys
from fedround.tasks.core.serialization import sha256_hex
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


@pytest.mark.security("stale-lock")
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
    # the head only moves forward, whichever append moved it last
    head = AuditHead.model_validate_json(store.get(audit.head_key))
    assert head.sequence == 24
    assert head.sha256 == sha256_hex(store.get(keys.audit_entry_key("f", 24)))
    assert audit.check().problems == [] and audit.check().notes == []
    audit._move_head(3, "0" * 64, attempts=5)  # a slow appender of entry 3 finishing late
    assert AuditHead.model_validate_json(store.get(audit.head_key)).sequence == 24


def _entry_key(sequence: int) -> str:
    return keys.audit_entry_key("f", sequence)


@pytest.mark.security("audit-unanchored")
def test_malformed_lines_are_reported_and_the_rest_still_checked(
    store: LocalObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(store, "f")
    for i in range(5):
        audit.append("reject", "m", version=str(i), actor="alice")
    missing_actor = json.loads(store.get(_entry_key(3)))
    del missing_actor["actor"]
    wrong_type = json.loads(store.get(_entry_key(4)))
    wrong_type["sequence"] = "four"
    store.put(_entry_key(1), b"[1, 2]\n")
    store.put(_entry_key(2), b"not json\n")
    store.put(_entry_key(3), json.dumps(missing_actor).encode() + b"\n")
    store.put(_entry_key(4), json.dumps(wrong_type).encode() + b"\n")

    uri = {n: store.uri(_entry_key(n)) for n in range(1, 5)}
    assert audit.verify() == [
        f"line 1 ({uri[1]}): not a JSON object (a JSON list)",
        f"line 2 ({uri[2]}): not valid JSON: Expecting value: line 1 column 1 (char 0)",
        f"line 3 ({uri[3]}): missing field 'actor'",
        f"line 4 ({uri[4]}): field 'sequence': Input should be a valid integer, unable to "
        "parse string as an integer",
        "entry 5 does not chain to the entry before it",  # checked after the bad lines
    ]

    # listings skip a malformed line, naming it, instead of failing on it
    with caplog.at_level(logging.WARNING, logger="fedround.tasks.audit"):
        assert [e.sequence for e in audit.entries()] == [5]
    assert caplog.text.count("skipping a malformed audit log entry") == 4
    assert uri[2] in caplog.text
    entries, unreadable = audit.read()
    assert [e.sequence for e in entries] == [5] and len(unreadable) == 4

    # appends still work, and chain to the stored bytes
    assert audit.append("promote", "m", version="9").sequence == 6
    assert len(audit.verify()) == 5


@pytest.mark.security("audit-unanchored")
def test_the_head_reveals_entries_deleted_from_the_end(store: LocalObjectStore) -> None:
    audit = AuditLog(store, "f")
    for i in range(3):
        audit.append("reject", "m", version=str(i))
    assert audit.verify() == []

    store.delete(_entry_key(3))
    assert audit.verify() == [
        "the head records entry 3 but the log ends at entry 2: entries were deleted from "
        "its end, or the log was rewritten"
    ]
    # the next entry is numbered after the head: the gap stays in the log for good
    assert audit.append("promote", "m", version="7").sequence == 4
    assert audit.verify() == ["entry 3 is missing (found 4 next)"]

    for key in store.list("f/audit/"):
        if key.endswith(".jsonl"):
            store.delete(key)
    assert audit.verify() == [
        "the head records entry 4 but the log is empty: entries were deleted from its end, "
        "or the log was rewritten"
    ]


@pytest.mark.security("audit-unanchored")
def test_a_log_rewritten_with_a_valid_chain_does_not_match_its_head(
    store: LocalObjectStore,
) -> None:
    audit = AuditLog(store, "f")
    audit.append("promote", "m", version="1", reason="gates passed", actor="alice")
    audit.append("reject", "m", version="2", reason="failed global_gain", actor="bob")
    first = AuditEntry.model_validate_json(store.get(_entry_key(1)))
    forged = first.model_copy(update={"reason": "no gates"}).model_dump_json().encode() + b"\n"
    second = AuditEntry.model_validate_json(store.get(_entry_key(2)))
    rechained = second.model_copy(update={"previous_sha256": sha256_hex(forged)})
    store.put(_entry_key(1), forged)
    store.put(_entry_key(2), rechained.model_dump_json().encode() + b"\n")

    assert audit.verify() == [
        "entry 2 does not match the sha256 its head records: it was edited, or the log was "
        "rewritten"
    ]


def _legacy_log(store: LocalObjectStore, count: int) -> None:
    """Entries as written before heads existed (no ``anchored`` field, no head.json)."""
    previous: bytes | None = None
    for sequence in range(1, count + 1):
        entry = AuditEntry(
            sequence=sequence,
            at=datetime.now(UTC),
            actor="alice",
            action="promote",
            model="m",
            version=str(sequence),
            previous_sha256=sha256_hex(previous) if previous is not None else None,
        )
        line = entry.model_dump_json(exclude={"anchored"}).encode() + b"\n"
        assert b"anchored" not in line
        assert store.create(_entry_key(sequence), line)
        previous = line


def test_a_log_from_before_heads_gets_a_note_and_a_head_on_its_next_append(
    store: LocalObjectStore,
) -> None:
    _legacy_log(store, 2)
    audit = AuditLog(store, "f")
    check = audit.check()
    assert check.problems == []
    assert check.notes == [
        f"no head recorded at {store.uri('f/audit/head.json')}: this log predates heads, so "
        "entries deleted from its end cannot be detected; the next append records one"
    ]

    assert audit.append("rollback", "m", version="1").anchored
    assert audit.check().problems == [] and audit.check().notes == []  # chains to entry 2

    store.delete(audit.head_key)  # deleting the head (with or without the end) is noticed
    assert audit.verify() == [
        f"no head recorded at {store.uri('f/audit/head.json')}, but entry 3 was written with "
        "one: the head was deleted (or the append of the log's first entry is still running "
        "or was interrupted; the next append writes it)"
    ]


@pytest.mark.security("audit-unanchored")
def test_an_unreadable_head_fails_the_check_and_an_append_past_the_head_is_a_note(
    store: LocalObjectStore,
) -> None:
    audit = AuditLog(store, "f")
    audit.append("promote", "m", version="1")
    store.put(audit.head_key, b"garbage")
    assert len(audit.verify()) == 1
    assert audit.verify()[0].startswith(f"the head {store.uri(audit.head_key)} is unreadable:")
    audit.append("promote", "m", version="2")  # replaces the unreadable head
    assert audit.verify() == []

    # an append that wrote its entry but died before moving the head
    previous = store.get(_entry_key(2))
    entry = AuditEntry(
        sequence=3,
        at=datetime.now(UTC),
        actor="carol",
        action="reject",
        model="m",
        previous_sha256=sha256_hex(previous),
        anchored=True,
    )
    assert store.create(_entry_key(3), entry.model_dump_json().encode() + b"\n")
    check = audit.check()
    assert check.problems == []
    assert check.notes == [
        "the head records entry 2; entry 3 came after its last move (an append still "
        "running, or one interrupted before moving it; the next append moves it)"
    ]
    audit.append("promote", "m", version="3")
    assert audit.check().notes == []


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state dir with a local object store; the CLI's environment is put back afterwards."""
    saved = dict(os.environ)
    monkeypatch.delenv("FEDROUND_OBJECT_STORE", raising=False)
    yield tmp_path / "state"
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.security("audit-unanchored")
def test_cli_audit_reports_a_malformed_line_without_a_traceback(state: Path) -> None:
    store = LocalObjectStore(state / "objects")
    audit = AuditLog(store, "f")
    for i in range(3):
        audit.append("reject", "m", version=str(i))
    runner = CliRunner()
    arguments = ["audit", "f", "--state-dir", str(state)]

    intact = runner.invoke(app, [*arguments, "--verify"])
    assert intact.exit_code == 0, intact.output
    assert "audit log intact" in intact.stderr
    assert len(intact.stdout.splitlines()) == 3

    store.put(_entry_key(2), b'{"sequence": 2, "at": "yesterday"\n')
    verified = runner.invoke(app, [*arguments, "--verify"])
    assert verified.exit_code == 1 and isinstance(verified.exception, SystemExit)
    assert "Traceback" not in verified.output
    assert f"audit log problem: line 2 ({store.uri(_entry_key(2))}): not valid JSON" in (
        verified.stderr
    )
    assert "audit log problem: entry 3 does not chain to the entry before it" in (verified.stderr)
    assert [json.loads(line)["sequence"] for line in verified.stdout.splitlines()] == [1, 3]

    listed = runner.invoke(app, arguments)  # an incomplete listing does not pass for whole
    assert listed.exit_code == 1 and isinstance(listed.exception, SystemExit)
    assert "(not listed)" in listed.stderr and "1 malformed entries left out" in listed.stderr
    assert [json.loads(line)["sequence"] for line in listed.stdout.splitlines()] == [1, 3]
