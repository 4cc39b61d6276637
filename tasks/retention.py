"""Checkpoint retention, backup and restore, and bucket versioning.

- :func:`prune_checkpoints` deletes committed checkpoints older than a given age (default
  90 days, by the manifest's ``created_at``), except those behind a registered model
  version (a checkpoint whose weights digest is some version's ``fedround.weights_sha256``
  stays as long as that version exists) and the latest readable checkpoint of every run,
  whatever its age (a run in progress resumes from it, and ``--older-than 0s`` must not
  take it), and every checkpoint of a run that is still open (its coordinator holds the
  run lock ``run-<run id>``, :mod:`fedround.tasks.run_lock`, with a live lease). Data
  files go first and the manifest last, so an interrupted prune leaves a checkpoint that
  the next prune finishes removing. A prune holds each federation's ``prune`` lock while
  it deletes there, so two prunes of one federation never interleave.

  Without the registry nothing is protected, so pruning refuses, deleting nothing, when
  the registry cannot be read (:func:`protected_digests`) or lists no version with a
  weights digest while there are checkpoints to prune (a reset registry, or a wrong
  ``MLFLOW_TRACKING_URI``), unless the operator passes ``--no-registry-check``.
- :func:`copy_run_checkpoints` copies every committed checkpoint of a run to another store
  (a backup bucket, or back for a restore), checking each file's SHA-256 against its
  manifest before writing and again after reading the copy back.
- :func:`enable_versioning` turns S3 bucket versioning on, so an overwritten or deleted
  checkpoint stays recoverable (expire old versions with a bucket lifecycle rule, or
  prune with ``purge_versions``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from fedround.tasks.checkpoints import (
    MANIFEST,
    STRATEGY,
    STRATEGY_TENSORS,
    WEIGHTS,
    strategy_tensors_sha256,
)
from fedround.tasks.core import keys
from fedround.tasks.core.errors import (
    CheckpointError,
    ConfigError,
    FedroundError,
    ObjectNotFound,
)
from fedround.tasks.core.manifest import CheckpointManifest
from fedround.tasks.core.serialization import sha256_hex
from fedround.tasks.locks import Lock, LockHeld, default_holder, lease_expired, read_lock
from fedround.tasks.object_store import ObjectStore, S3ObjectStore
from fedround.tasks.run_lock import run_lock_name

log = logging.getLogger(__name__)

DEFAULT_RETENTION = timedelta(days=90)
_AGE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
NO_REGISTRY_CHECK = "--no-registry-check"  # the CLI's override (registry_check=False here)
_CHECKPOINT = re.compile(r"^(?P<federation>[^/]+)/checkpoints/(?P<run>[^/]+)/round-(?P<round>\d+)/")


class PruneRefused(FedroundError):
    """Pruning would run without the model registry's protection; nothing was deleted."""


def parse_age(text: str) -> timedelta:
    """``90d``, ``12h``, ``2w``, ``30m``, ``0s``."""
    match = _AGE.match(text.strip())
    if match is None:
        raise ConfigError(f"age {text!r}: use a number and a unit, e.g. 90d, 12h, 2w, 30m")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@dataclass(frozen=True)
class CheckpointRef:
    federation: str
    run_id: str
    round: int

    @property
    def prefix(self) -> str:
        return keys.checkpoint_prefix(self.federation, self.run_id, self.round)


def find_checkpoints(store: ObjectStore, federation: str | None = None) -> list[CheckpointRef]:
    """Committed checkpoints (those with a manifest) of one federation, or of all."""
    found = set()
    for key in store.list(f"{federation}/checkpoints/" if federation else ""):
        match = _CHECKPOINT.match(key)
        if match and key.endswith("/" + MANIFEST):
            found.add(
                CheckpointRef(
                    match.group("federation"), match.group("run"), int(match.group("round"))
                )
            )
    return sorted(found, key=lambda c: (c.federation, c.run_id, c.round))


def registered_digests(tracking_uri: str) -> dict[str, list[str]]:
    """Weights digest → the registered versions (``name/version``) standing behind it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    digests: dict[str, list[str]] = {}
    token = None
    while True:
        page = client.search_model_versions(max_results=1000, page_token=token)
        for version in page:
            digest = version.tags.get("fedround.weights_sha256")
            if digest:
                digests.setdefault(digest, []).append(f"{version.name}/{version.version}")
        token = page.token
        if not token:
            return digests


def _without_credentials(text: str, uri: str) -> str:
    """``text`` for a message, with the credentials in ``uri`` (``https://user:pw@host``)
    left out wherever they appear (MLflow's errors repeat the URI)."""
    netloc = urlsplit(uri).netloc
    if "@" not in netloc:
        return text
    return text.replace(netloc.rsplit("@", 1)[0] + "@", "***@")


def protected_digests(tracking_uri: str, registry_check: bool = True) -> dict[str, list[str]]:
    """:func:`registered_digests` for :func:`prune_checkpoints`: raises
    :class:`PruneRefused` if the registry cannot be read, or, with ``registry_check``
    off, warns and protects nothing."""
    try:
        return registered_digests(tracking_uri)
    except Exception as exc:  # anything: refused connection, auth, a broken database, ...
        where = _without_credentials(tracking_uri, tracking_uri)
        reason = _without_credentials(
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            tracking_uri,
        )
        if registry_check:
            raise PruneRefused(
                f"the model registry at {where} could not be read ({reason}); without it "
                "no checkpoint behind a registered model version is protected, so nothing "
                "was deleted. Check MLFLOW_TRACKING_URI and that the tracking server is up, "
                f"or pass {NO_REGISTRY_CHECK} to prune anyway (registered versions' "
                "checkpoints are then deleted like any other; each run's latest is kept)"
            ) from exc
        log.warning(
            "the model registry at %s could not be read (%s); %s: pruning without "
            "protecting registered versions' checkpoints",
            where,
            reason,
            NO_REGISTRY_CHECK,
        )
        return {}


@dataclass
class PruneReport:
    deleted: list[CheckpointRef] = field(default_factory=list)
    kept_registered: dict[str, list[str]] = field(default_factory=dict)  # prefix → versions
    kept_latest: list[CheckpointRef] = field(default_factory=list)  # each run's newest
    kept_unreadable: list[CheckpointRef] = field(default_factory=list)  # manifest unreadable
    kept_open: list[CheckpointRef] = field(default_factory=list)  # their run is still open
    kept_recent: int = 0
    bytes_freed: int = 0
    versions_purged: int = 0
    dry_run: bool = False


def _purge_versions(store: S3ObjectStore, key: str) -> int:
    """Delete every stored version of ``key`` (versioned buckets keep them after a delete)."""
    removed = 0
    for obj in store.client.list_objects(store.bucket, prefix=key, include_version=True):
        if obj.object_name == key:
            store.client.remove_object(store.bucket, key, version_id=obj.version_id)
            removed += 1
    return removed


def prune_checkpoints(
    store: ObjectStore,
    keep_digests: dict[str, list[str]],
    older_than: timedelta = DEFAULT_RETENTION,
    federation: str | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    purge_versions: bool = False,
    registry_check: bool = True,
) -> PruneReport:
    """Delete checkpoints older than ``older_than`` unless a registered version needs them
    or they are their run's latest.

    ``keep_digests`` is what the registry protects (:func:`protected_digests`). Empty
    while there are checkpoints, it raises :class:`PruneRefused` before anything is
    deleted (also in a dry run, which shows what a real prune would do), unless
    ``registry_check`` is off.
    """
    now = now or datetime.now(UTC)
    refs = find_checkpoints(store, federation)
    if registry_check and refs and not keep_digests:
        scope = f"federation {federation}" if federation else "all federations"
        raise PruneRefused(
            f"the model registry lists no model version with a weights digest "
            f"(fedround.weights_sha256), yet {len(refs)} checkpoints exist in {scope}: "
            "pruning would protect none of them, so nothing was deleted. If the registry "
            "was reset or MLFLOW_TRACKING_URI points at the wrong server, fix that first; "
            f"if no model was ever registered, pass {NO_REGISTRY_CHECK}"
        )
    report = PruneReport(dry_run=dry_run)
    locks = [] if dry_run else _prune_locks(store, sorted({ref.federation for ref in refs}))
    try:
        _prune(store, refs, keep_digests, older_than, now, dry_run, purge_versions, report)
    finally:
        for lock in locks:
            lock.release()
    return report


def run_is_open(store: ObjectStore, federation: str, run_id: str) -> bool:
    """Whether a coordinator holds the run's lock with a lease that has not run out."""
    info = read_lock(store, keys.lock_key(federation, run_lock_name(run_id)))
    return info is not None and not info.get("broken") and not lease_expired(info)


def _prune_locks(store: ObjectStore, federations: list[str]) -> list[Lock]:
    """Each federation's ``prune`` lock, all or none: :class:`LockHeld` names the holder."""
    held: list[Lock] = []
    try:
        for federation in federations:
            lock = Lock(
                store,
                keys.lock_key(federation, "prune"),
                ttl_s=3600.0,
                holder=default_holder(),
                purpose=f"prune checkpoints of {federation}",
            )
            held.append(lock.acquire())
    except LockHeld:
        for lock in held:
            lock.release()
        raise
    return held


def _prune(
    store: ObjectStore,
    refs: list[CheckpointRef],
    keep_digests: dict[str, list[str]],
    older_than: timedelta,
    now: datetime,
    dry_run: bool,
    purge_versions: bool,
    report: PruneReport,
) -> None:
    manifests: dict[CheckpointRef, CheckpointManifest] = {}
    open_runs = {
        (ref.federation, ref.run_id)
        for ref in refs
        if run_is_open(store, ref.federation, ref.run_id)
    }
    for ref in refs:
        if (ref.federation, ref.run_id) in open_runs:
            report.kept_open.append(ref)  # its coordinator is writing: not even read
            continue
        try:
            manifests[ref] = CheckpointManifest.from_json(store.get(ref.prefix + MANIFEST))
        except (ObjectNotFound, ValueError) as exc:
            log.warning("skipping %s: unreadable manifest (%s)", store.uri(ref.prefix), exc)
            report.kept_unreadable.append(ref)
    # Each run's newest checkpoint that reads: the one it resumes from (a newer one with an
    # unreadable manifest is kept above, but cannot be resumed from).
    latest: dict[tuple[str, str], CheckpointRef] = {}
    for ref in manifests:  # in round order
        latest[(ref.federation, ref.run_id)] = ref
    for ref, manifest in manifests.items():
        if manifest.weights_sha256 in keep_digests:
            report.kept_registered[ref.prefix] = keep_digests[manifest.weights_sha256]
            continue
        if latest[(ref.federation, ref.run_id)] == ref:
            report.kept_latest.append(ref)
            continue
        if now - manifest.created_at < older_than:
            report.kept_recent += 1
            continue
        report.deleted.append(ref)
        # The manifest last: see the module doc (a strategy without tensors has no file).
        for name in (WEIGHTS, STRATEGY_TENSORS, STRATEGY, MANIFEST):
            key = ref.prefix + name
            try:
                report.bytes_freed += store.size(key)
            except ObjectNotFound:
                continue
            if dry_run:
                continue
            store.delete(key)
            if purge_versions and isinstance(store, S3ObjectStore):
                report.versions_purged += _purge_versions(store, key)


@dataclass
class CopyReport:
    federation: str
    run_id: str
    source: str
    destination: str
    rounds: dict[int, str] = field(default_factory=dict)  # round → weights sha256 (verified)
    files: int = 0
    bytes: int = 0


def _verified_files(store: ObjectStore, prefix: str) -> dict[str, bytes]:
    """A checkpoint's files, each checked against the manifest (the strategy's tensors,
    when it has any, against the digest in strategy.json)."""
    manifest_bytes = store.get(prefix + MANIFEST)
    manifest = CheckpointManifest.from_json(manifest_bytes)
    files = {MANIFEST: manifest_bytes}
    for name, expected in (
        (WEIGHTS, manifest.weights_sha256),
        (STRATEGY, manifest.strategy_state_sha256),
    ):
        try:
            data = store.get(prefix + name)
        except ObjectNotFound:
            raise CheckpointError(f"{store.uri(prefix + name)} is missing") from None
        actual = sha256_hex(data)
        if actual != expected:
            raise CheckpointError(
                f"{store.uri(prefix + name)} has sha256 {actual[:12]}…, its manifest says "
                f"{expected[:12]}…: refusing to copy a corrupted checkpoint"
            )
        files[name] = data
    tensors_sha256 = strategy_tensors_sha256(files[STRATEGY])
    if tensors_sha256 is not None:
        try:
            data = store.get(prefix + STRATEGY_TENSORS)
        except ObjectNotFound:
            raise CheckpointError(f"{store.uri(prefix + STRATEGY_TENSORS)} is missing") from None
        if sha256_hex(data) != tensors_sha256:
            raise CheckpointError(
                f"{store.uri(prefix + STRATEGY_TENSORS)} does not match the digest in "
                "strategy.json: refusing to copy a corrupted checkpoint"
            )
        files[STRATEGY_TENSORS] = data
    return files


def copy_run_checkpoints(
    source: ObjectStore, destination: ObjectStore, federation: str, run_id: str
) -> CopyReport:
    """Copy a run's committed checkpoints, verifying every digest on both sides."""
    rounds = keys.checkpoint_rounds(source.list(keys.checkpoints_prefix(federation, run_id)))
    if not rounds:
        raise CheckpointError(
            f"no committed checkpoints of run {run_id} under "
            f"{source.uri(keys.checkpoints_prefix(federation, run_id))}"
        )
    report = CopyReport(
        federation,
        run_id,
        source.uri(keys.checkpoints_prefix(federation, run_id)),
        destination.uri(keys.checkpoints_prefix(federation, run_id)),
    )
    for round_ in rounds:
        prefix = keys.checkpoint_prefix(federation, run_id, round_)
        files = _verified_files(source, prefix)
        for name in (WEIGHTS, STRATEGY_TENSORS, STRATEGY, MANIFEST):  # manifest last
            if name in files:
                destination.put(prefix + name, files[name])
        copied = _verified_files(destination, prefix)
        if copied != files:
            raise CheckpointError(f"the copy of {destination.uri(prefix)} differs from its source")
        report.rounds[round_] = CheckpointManifest.from_json(files[MANIFEST]).weights_sha256
        report.files += len(files)
        report.bytes += sum(len(data) for data in files.values())
    return report


def enable_versioning(store: ObjectStore) -> str:
    """Turn bucket versioning on (S3 only); returns the bucket's versioning status."""
    if not isinstance(store, S3ObjectStore):
        return "not applicable (local directory store)"
    from minio.versioningconfig import ENABLED, VersioningConfig

    store.client.set_bucket_versioning(store.bucket, VersioningConfig(ENABLED))
    return str(store.client.get_bucket_versioning(store.bucket).status)


def versioning_status(store: ObjectStore) -> str:
    if not isinstance(store, S3ObjectStore):
        return "not applicable (local directory store)"
    return str(store.client.get_bucket_versioning(store.bucket).status)


def ensure_bucket(store: ObjectStore) -> None:
    """Create an S3 bucket if it does not exist (needs an admin credential)."""
    if isinstance(store, S3ObjectStore) and not store.client.bucket_exists(store.bucket):
        store.client.make_bucket(store.bucket)


def describe(refs: Iterable[CheckpointRef]) -> list[str]:
    return [f"{r.federation}/{r.run_id}/round-{r.round:04d}" for r in refs]
