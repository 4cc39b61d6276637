"""Checkpoints, locks and the audit log on the real S3 server (``weed mini``), with the
registry on the real MLflow server: conditional writes are atomic across processes,
tampering is detected, retention keeps what a registered version needs, and backups
restore with every digest verified."""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedround.flows.cli.main import app
from fedround.tasks.audit import AuditLog
from fedround.tasks.checkpoints import MANIFEST, WEIGHTS, load_checkpoint, save_checkpoint
from fedround.tasks.core import keys
from fedround.tasks.core.config import LimitsConfig, ModelConfig, parse_federation_config
from fedround.tasks.core.errors import CheckpointError, ObjectTooLarge
from fedround.tasks.core.manifest import CheckpointManifest
from fedround.tasks.core.models import build_model
from fedround.tasks.locks import Lock
from fedround.tasks.object_store import S3ObjectStore
from fedround.tasks.registry import register_candidate
from fedround.tasks.retention import (
    copy_run_checkpoints,
    ensure_bucket,
    find_checkpoints,
    prune_checkpoints,
    registered_digests,
    versioning_status,
)
from fedround.tasks.site_storage import sites_over_quota
from fedround.tasks.tracking import RunTracker
from tests.services import Endpoints


def admin_store(services: Endpoints, bucket: str | None = None) -> S3ObjectStore:
    return S3ObjectStore(
        services.s3_endpoint,
        bucket or services.s3_bucket,
        services.admin_access_key,
        services.admin_secret_key,
        region=services.s3_region,
    )


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.arange(3, dtype=torch.float32)}


def checkpoint(
    store: S3ObjectStore,
    federation: str,
    run_id: str,
    round_: int,
    value: float,
    age: timedelta = timedelta(0),
) -> CheckpointManifest:
    manifest = save_checkpoint(
        store,
        federation=federation,
        run_id=run_id,
        round_=round_,
        weights=weights(value),
        strategy="fedavg",
        strategy_state={"round": round_},
        config_sha256="c" * 64,
    )
    if age:  # an old checkpoint: rewrite its manifest's creation time
        manifest = manifest.model_copy(update={"created_at": datetime.now(UTC) - age})
        store.put(keys.checkpoint_prefix(federation, run_id, round_) + MANIFEST, manifest.to_json())
    return manifest


def _race(args: tuple[str, str, str, str, str, str]) -> bool:
    endpoint, bucket, access, secret, region, key = args
    store = S3ObjectStore(endpoint, bucket, access, secret, region=region)
    barrier.wait()  # type: ignore[name-defined]  # set by the pool initializer
    return Lock(store, key, ttl_s=60, holder="racer").try_acquire()


def _init(shared: multiprocessing.synchronize.Barrier) -> None:  # type: ignore[name-defined]
    global barrier
    barrier = shared  # type: ignore[name-defined]


def test_lock_is_atomic_across_processes_on_s3(s3_service: Endpoints) -> None:
    """Six processes race for each lock at once: exactly one wins every time."""
    context = multiprocessing.get_context("fork")
    prefix = f"lock-race-{uuid.uuid4().hex[:8]}"
    for trial in range(5):
        shared = context.Barrier(6)
        args = (
            s3_service.s3_endpoint,
            s3_service.s3_bucket,
            s3_service.admin_access_key,
            s3_service.admin_secret_key,
            s3_service.s3_region,
            keys.lock_key(prefix, f"promotion-{trial}"),
        )
        with context.Pool(6, initializer=_init, initargs=(shared,)) as pool:
            wins = pool.map(_race, [args] * 6)
        assert sum(wins) == 1, wins


@pytest.mark.security("audit-unanchored")
def test_audit_log_appends_concurrently_and_chains_on_s3(s3_service: Endpoints) -> None:
    audit = AuditLog(admin_store(s3_service), f"audit-{uuid.uuid4().hex[:8]}")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        entries = list(pool.map(lambda i: audit.append("reject", "m", version=str(i)), range(12)))
    assert sorted(e.sequence for e in entries) == list(range(1, 13))
    assert audit.verify() == []
    # the head (moved by compare-and-swap on S3) records the last entry
    assert audit.check().notes == []
    audit.store.delete(keys.audit_entry_key(audit.federation, 12))
    assert audit.verify() == [
        "the head records entry 12 but the log ends at entry 11: entries were deleted from "
        "its end, or the log was rewritten"
    ]


@pytest.mark.security("unsigned-updates")
def test_concurrent_key_registrations_and_a_revocation_all_land_on_s3(
    s3_service: Endpoints,
) -> None:
    """The site's key ring is changed by compare-and-swap on the real server: eight
    registrations and a revocation racing each other all land, each audited once."""
    from concurrent.futures import ThreadPoolExecutor

    from fedround.tasks.core.signing import SigningKey
    from fedround.tasks.site_keys import load_key_ring, register_key, revoke_key

    store = admin_store(s3_service)
    federation = f"keys-{uuid.uuid4().hex[:8]}"
    first = SigningKey.generate()
    register_key(store, federation, "a", first.registered())
    new = [SigningKey.generate() for _ in range(8)]

    def change(i: int) -> object:
        if i == len(new):
            return revoke_key(store, federation, "a", first.key_id, "compromised")
        return register_key(store, federation, "a", new[i].registered())

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(change, range(len(new) + 1)))

    ring = load_key_ring(store, federation, "a")
    assert {k.key_id for k in ring.keys} == {first.key_id, *(k.key_id for k in new)}
    assert [k.key_id for k in ring.keys if k.revoked_at is not None] == [first.key_id]
    audit = AuditLog(store, federation)
    actions = sorted(e.action for e in audit.entries())
    assert actions == ["key-register"] * 9 + ["key-revoke"]
    assert audit.verify() == []


def test_checkpoint_tampering_is_detected_and_versions_keep_the_original(
    s3_service: Endpoints,
) -> None:
    store = admin_store(s3_service)
    assert versioning_status(store) == "Enabled"
    federation, run_id = f"tamper-{uuid.uuid4().hex[:8]}", "run-1"
    checkpoint(store, federation, run_id, 1, 0.5)
    key = keys.checkpoint_prefix(federation, run_id, 1) + WEIGHTS
    original = store.get(key)
    store.put(key, original[:-4] + b"\x00\x00\x80\x7f")  # last float becomes +inf
    with pytest.raises(CheckpointError, match=r"checkpoint round 1 of run run-1 is corrupted"):
        load_checkpoint(store, federation, run_id, 1)
    versions = [
        o
        for o in store.client.list_objects(store.bucket, prefix=key, include_version=True)
        if o.object_name == key
    ]
    assert len(versions) == 2  # bucket versioning kept the good bytes
    old = next(o for o in versions if str(o.is_latest).lower() != "true")
    response = store.client.get_object(store.bucket, key, version_id=old.version_id)
    assert response.read() == original


@pytest.fixture(scope="module")
def registered(mlflow_service: Endpoints) -> tuple[str, str, str]:
    """A model version registered on the real MLflow server from run 'kept''s weights."""
    federation = f"retention-{uuid.uuid4().hex[:8]}"
    config = parse_federation_config(
        f"federation: {federation}\ncontract: c.json\nsites: [{{name: a}}]\n"
    )
    tracker = RunTracker.start(mlflow_service.mlflow_tracking_uri, config, "kept", tags={})
    model_weights = build_model(config.model, seed=1).state_dict()
    registered = register_candidate(tracker, config, model_weights, {"fedround.run_id": "kept"})
    tracker.finish()
    return federation, registered.version, config.model_name


@pytest.mark.security("prune-loses-models")
def test_retention_keeps_checkpoints_of_registered_versions(
    mlflow_service: Endpoints, registered: tuple[str, str, str]
) -> None:
    federation, version, model_name = registered
    store = admin_store(mlflow_service)
    old = timedelta(days=120)
    final = build_model(ModelConfig(), seed=1).state_dict()  # what the registered run produced
    for round_ in (1, 2):
        checkpoint(store, federation, "kept", round_, float(round_), age=old)
    manifest = save_checkpoint(
        store,
        federation=federation,
        run_id="kept",
        round_=3,
        weights=final,
        strategy="fedavg",
        strategy_state={},
        config_sha256="c" * 64,
    )
    store.put(
        keys.checkpoint_prefix(federation, "kept", 3) + MANIFEST,
        manifest.model_copy(update={"created_at": datetime.now(UTC) - old}).to_json(),
    )
    for round_ in (1, 2):
        checkpoint(store, federation, "unregistered", round_, 9.0 + round_, age=old)
        checkpoint(store, federation, "recent", round_, 7.0 + round_)

    digests = registered_digests(mlflow_service.mlflow_tracking_uri)
    assert digests[manifest.weights_sha256] == [f"{model_name}/{version}"]
    dry = prune_checkpoints(store, digests, timedelta(days=90), federation, dry_run=True)
    assert len(dry.deleted) == 3 and store.exists(
        keys.checkpoint_prefix(federation, "kept", 1) + MANIFEST
    )

    report = prune_checkpoints(store, digests, timedelta(days=90), federation)
    left = {(r.run_id, r.round) for r in find_checkpoints(store, federation)}
    assert left == {("kept", 3), ("unregistered", 2), ("recent", 1), ("recent", 2)}
    assert sorted((r.run_id, r.round) for r in report.deleted) == [
        ("kept", 1),
        ("kept", 2),
        ("unregistered", 1),
    ]
    assert list(report.kept_registered.values()) == [[f"{model_name}/{version}"]]
    # each run's latest checkpoint stays whatever its age ("kept" 3 is also registered)
    assert [(r.run_id, r.round) for r in report.kept_latest] == [("recent", 2), ("unregistered", 2)]
    assert report.kept_recent == 1
    load_checkpoint(store, federation, "kept", 3)  # the registered weights still verify


def test_backup_and_restore_verify_every_digest(
    mlflow_service: Endpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = admin_store(mlflow_service)
    federation, run_id = f"backup-{uuid.uuid4().hex[:8]}", "run-9"
    digests = {
        r: checkpoint(store, federation, run_id, r, float(r)).weights_sha256 for r in (0, 1, 2)
    }
    for name, value in mlflow_service.env().items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path)]
    bucket = f"fedround-backup-{uuid.uuid4().hex[:6]}"

    done = runner.invoke(
        app,
        [
            "checkpoints",
            "backup",
            run_id,
            "--federation",
            federation,
            "--to",
            f"s3://{bucket}",
            *state,
        ],
    )
    assert done.exit_code == 0, done.output
    assert "copied 3 checkpoints" in done.output and "every digest verified" in done.output
    backup = admin_store(mlflow_service, bucket)
    for round_, digest in digests.items():
        assert load_checkpoint(backup, federation, run_id, round_).manifest.weights_sha256 == digest

    key = keys.checkpoint_prefix(federation, run_id, 2) + WEIGHTS
    store.put(key, store.get(key)[:-4] + b"\x00\x00\x00\x00")  # damage the original
    with pytest.raises(CheckpointError):
        load_checkpoint(store, federation, run_id, 2)
    refused = runner.invoke(
        app,
        [
            "checkpoints",
            "backup",
            run_id,
            "--federation",
            federation,
            "--to",
            str(tmp_path / "b"),
            *state,
        ],
    )
    assert refused.exit_code == 1
    assert "refusing to copy a corrupted checkpoint" in refused.output

    restored = runner.invoke(
        app,
        [
            "checkpoints",
            "restore",
            run_id,
            "--federation",
            federation,
            "--from",
            f"s3://{bucket}",
            *state,
        ],
    )
    assert restored.exit_code == 0, restored.output
    assert load_checkpoint(store, federation, run_id, 2).manifest.weights_sha256 == digests[2]

    ensure_bucket(backup)  # idempotent
    report = copy_run_checkpoints(backup, admin_store(mlflow_service), federation, run_id)
    assert report.rounds == digests
    assert (
        json.loads(store.get(keys.checkpoint_prefix(federation, run_id, 0) + MANIFEST))["round"]
        == 0
    )


@pytest.mark.security("untrusted-site-objects")
def test_a_bounded_read_on_s3_stops_at_the_limit_and_the_client_stays_usable(
    s3_service: Endpoints,
) -> None:
    """A site's oversized object is refused after ``max_bytes + 1`` bytes of one GET; the
    connection that was cut short does not break the next request."""
    store = S3ObjectStore(
        s3_service.s3_endpoint,
        s3_service.s3_bucket,
        s3_service.admin_access_key,
        s3_service.admin_secret_key,
        region=s3_service.s3_region,
    )
    key = f"bounded-{uuid.uuid4().hex[:8]}/heartbeat.json"
    store.put(key, b"{" + b" " * (8 * 1024 * 1024) + b"}")  # an 8 MiB "heartbeat"
    with pytest.raises(ObjectTooLarge, match="larger than the 65,536 bytes allowed"):
        store.get(key, max_bytes=65_536)
    store.put(key, b'{"beat": 4}')
    for _ in range(3):  # the pooled connections still work
        assert store.get(key, max_bytes=65_536) == b'{"beat": 4}'


# --- the run lease and lock breaking on S3 (If-Match on the lock's ETag) -------------------


@pytest.mark.security("two-coordinators", "stale-lock")
def test_run_lease_renews_refuses_a_second_coordinator_and_is_taken_over_on_s3(
    s3_service: Endpoints,
) -> None:
    from fedround.tasks.locks import LockLost, break_lock
    from fedround.tasks.run_lock import RunLease, RunLocked

    store = admin_store(s3_service)
    federation = f"lease-{uuid.uuid4().hex[:8]}"
    first = RunLease(store, federation, "r1", ttl_s=1.5).acquire()
    try:
        time.sleep(2.5)  # the background renewal keeps it past its first lease
        first.check()
        with pytest.raises(RunLocked, match=f"run r1 of federation {federation}"):
            RunLease(store, federation, "r1", holder="bob@other").acquire()
        # the holder's host is gone: its renewals stop (fault injected by stopping the
        # renewal thread; a live renewal racing the break is refused with LockHeld, by design)
        first._stop.set()
        assert first._thread is not None
        first._thread.join(timeout=10)
        break_lock(store, keys.lock_key(federation, "run-r1"), "coordinator host lost")
        with pytest.raises(LockLost):
            first.check()
        second = RunLease(store, federation, "r1", holder="bob@other").acquire()
        assert second.lock.took_over is None  # a broken lock is nobody's
        second.release()
    finally:
        first.release()
    assert not store.exists(keys.lock_key(federation, "run-r1"))


# --- heartbeats in a versioned bucket -------------------------------------------------------


@pytest.mark.security("storage-growth")
def test_old_heartbeat_versions_are_deleted_by_the_coordinator_on_s3(
    s3_service: Endpoints,
) -> None:
    """Measured: every heartbeat keeps a version (the bucket is versioned); the coordinator
    deletes the old ones while the run lasts and when it closes, keeping the current one."""
    from fedround.flows.distributed import DistributedDispatcher, _Session
    from fedround.site_workers.session_protocol import Heartbeat

    store = admin_store(s3_service)
    assert versioning_status(store) == "Enabled"
    federation = f"beats-{uuid.uuid4().hex[:8]}"
    config = parse_federation_config(
        f"federation: {federation}\ncontract: c.json\nsites: [{{name: site-a}}, {{name: site-b}}]\n"
    )
    dispatcher = DistributedDispatcher(config, store, run_id="r1")
    beats: dict[str, str] = {}
    for site in ("site-a", "site-b"):
        dispatcher.sessions[site] = _Session(attempt=1, started_at=time.monotonic())
        beats[site] = keys.session_key(federation, "r1", site, 1)
        with Heartbeat(store, interval=0.01) as beat:
            beat.add(beats[site], {"attempt": 1})
            while beat.beats < 30:
                time.sleep(0.01)

    def versions(key: str) -> int:
        listed = store.client.list_objects(store.bucket, prefix=key, include_version=True)
        return sum(1 for v in listed if v.object_name == key)

    assert all(versions(key) >= 30 for key in beats.values())  # they do pile up

    # while the run lasts: a live session's heartbeat is trimmed at most every few minutes
    dispatcher.sessions["site-a"].trimmed_at = time.monotonic() - 301
    assert dispatcher._alive_or_joining("site-a")
    assert versions(beats["site-a"]) == 1
    assert json.loads(store.get(beats["site-a"]))["beat"] >= 30  # the newest one stays
    assert versions(beats["site-b"]) >= 30

    dispatcher.close_run("finished")  # at the end: every session of the run
    assert [versions(key) for key in beats.values()] == [1, 1]
    assert json.loads(store.get(beats["site-b"]))["beat"] >= 30


# --- per-site storage quotas on the real S3 server ------------------------------------------


@pytest.mark.security("storage-growth")
def test_site_storage_is_measured_from_one_listing_on_s3(s3_service: Endpoints) -> None:
    """The update prefix's current objects are counted by size from the listing (an
    overwrite replaces, a sibling prefix is not counted), counting stops past the object
    cap, and the site over its quota is the one left out."""
    store = admin_store(s3_service)
    federation = f"quota-{uuid.uuid4().hex[:8]}"
    a = keys.site_write_prefix(federation, "site-a")
    for i in range(3):
        store.put(f"{a}run/round-{i:04d}/update.safetensors", b"u" * 1000)
    store.put(f"{a}run/round-0000/update.safetensors", b"u" * 1500)  # overwritten
    store.put(f"{keys.site_write_prefix(federation, 'site-ab')}junk.bin", b"j" * 9000)
    for i in range(12):
        store.put(f"{keys.site_write_prefix(federation, 'site-b')}junk/{i}", b"j")
    assert store.usage(a).bytes == 3500 and store.usage(a).objects == 3
    capped = store.usage(keys.site_write_prefix(federation, "site-b"), max_objects=4)
    assert capped.objects == 5 and not capped.complete
    limits = LimitsConfig(site_storage_bytes=4000, site_storage_objects=10)
    over = sites_over_quota(store, federation, ["site-a", "site-ab", "site-b"], limits)
    assert sorted(over) == ["site-ab", "site-b"]
    assert "holds 8.8 KiB (9,000 bytes)" in over["site-ab"]
    assert "holds at least 11 objects" in over["site-b"]
