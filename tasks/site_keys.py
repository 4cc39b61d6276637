"""The coordinator's registry of site public keys, in the object store.

Each site's :class:`~fedround.tasks.core.signing.KeyRing` lies at
``<federation>/registry/site-keys/<site>.json``, outside every site's write prefix: only
the coordinator (or an operator with its credentials) registers, rotates or revokes keys.
Every change is a compare-and-swap on the ring object (two concurrent registrations both
land) and is audited: ``key-register`` and ``key-revoke`` entries in the federation's audit
log, under the subject ``site-keys``; an update rejected for its signature adds an
``update-rejected`` entry under the model it was meant for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta

from fedround.tasks.audit import AuditLog
from fedround.tasks.core import keys
from fedround.tasks.core.errors import ConfigError, FedroundError, ObjectNotFound, RejectReason
from fedround.tasks.core.limits import UPDATE_MANIFEST_MAX_BYTES
from fedround.tasks.core.signing import KeyRing, RegisteredKey
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)

KEYS_SUBJECT = "site-keys"  # the ``model`` of key-registry audit entries


def _read_ring(store: ObjectStore, federation: str, site: str) -> tuple[KeyRing, bytes | None]:
    """The site's ring and the bytes it was parsed from (None: no ring stored yet)."""
    try:
        raw = store.get(keys.site_keys_key(federation, site), max_bytes=UPDATE_MANIFEST_MAX_BYTES)
    except ObjectNotFound:
        return KeyRing(site=site), None
    return KeyRing.from_json(raw), raw


def load_key_ring(store: ObjectStore, federation: str, site: str) -> KeyRing:
    """The site's registered keys (an empty ring when none are)."""
    return _read_ring(store, federation, site)[0]


def registered_sites(store: ObjectStore, federation: str) -> list[str]:
    """Sites with a key ring, sorted."""
    prefix = keys.site_keys_prefix(federation)
    return sorted(
        key.removeprefix(prefix).removesuffix(".json")
        for key in store.list(prefix)
        if key.endswith(".json")
    )


def signing_keys(
    store: ObjectStore,
    federation: str,
    sites: Iterable[str],
    required: bool = True,
    now: datetime | None = None,
) -> dict[str, tuple[RegisteredKey, ...] | None]:
    """Each site's keys valid now: what its updates are verified against
    (``UpdateExpectation.signing_keys``); None for every site when not ``required``."""
    if not required:
        return dict.fromkeys(sites)
    now = now or datetime.now(UTC)
    return {site: tuple(load_key_ring(store, federation, site).valid(now)) for site in sites}


def _change_ring(
    store: ObjectStore,
    federation: str,
    site: str,
    change: Callable[[KeyRing], KeyRing | None],
    attempts: int = 20,
) -> tuple[KeyRing, bool]:
    """Apply ``change`` to the site's ring as a compare-and-swap: of two concurrent
    changes neither is lost (the loser reads the winner's ring and applies its change
    again). ``change`` returns None when there is nothing to write. Returns the ring and
    whether this call wrote it."""
    key = keys.site_keys_key(federation, site)
    for _ in range(attempts):
        ring, raw = _read_ring(store, federation, site)
        updated = change(ring)
        if updated is None:
            return ring, False
        data = updated.to_json()
        written = store.create(key, data) if raw is None else store.replace(key, data, raw)
        if written:
            return updated, True
    raise ConfigError(
        f"could not update the key ring of site {site} of {federation} after {attempts} "
        "attempts: another writer keeps changing it"
    )


def _audit(
    store: ObjectStore,
    federation: str,
    action: str,
    subject: str,
    reason: str,
    details: dict[str, object],
) -> bool:
    """One audit entry about ``subject`` (a model, or the key registry); logged, never
    raised, when it cannot be written: what it records has already happened."""
    try:
        AuditLog(store, federation).append(action, subject, reason=reason, details=details)
    except FedroundError as exc:
        log.error("%s of %s was not written to the audit log: %s", action, federation, exc)
        return False
    return True


def register_key(
    store: ObjectStore,
    federation: str,
    site: str,
    key: RegisteredKey,
    overlap: timedelta | None = None,
) -> KeyRing:
    """Add ``key`` to the site's ring; with ``overlap`` (a rotation) every other key still
    valid stays valid only that much longer. Registering a key twice changes nothing; a
    revoked key is never registered again. Each change is audited (``key-register``)."""
    now = datetime.now(UTC)

    def add(ring: KeyRing) -> KeyRing | None:
        same = [k for k in ring.keys if k.key_id == key.key_id]
        if same and same[0].revoked_at is not None:
            raise ConfigError(
                f"key {key.key_id} of site {site} was revoked at {same[0].revoked_at}: a "
                "revoked key is never registered again; give the site a new key "
                "(fedround keys rotate)"
            )
        if same and overlap is None:
            return None
        stamped = key.model_copy(update={"registered_at": now})
        return ring.with_key(stamped, now + overlap if overlap is not None else None)

    updated, changed = _change_ring(store, federation, site, add)
    if changed:
        log.info("registered key %s for site %s of %s", key.key_id, site, federation)
        _audit(
            store,
            federation,
            "key-register",
            KEYS_SUBJECT,
            f"key {key.key_id} registered for site {site}"
            + (f", other keys retired after {overlap}" if overlap is not None else ""),
            {"site": site, "key_id": key.key_id, "overlap_s": overlap and overlap.total_seconds()},
        )
    return updated


def revoke_key(store: ObjectStore, federation: str, site: str, key_id: str, reason: str) -> KeyRing:
    """Revoke the site's key ``key_id`` now (a compromised key): every update signed with
    it from now on is rejected (``unknown_key``), and it is never registered again. The
    revocation is audited (``key-revoke``) with ``reason``."""
    if not reason.strip():
        raise ConfigError("a revocation needs a reason (it goes to the audit log)")
    now = datetime.now(UTC)
    updated, _ = _change_ring(
        store, federation, site, lambda ring: ring.revoked(key_id, now, reason.strip())
    )
    log.warning("revoked key %s of site %s of %s: %s", key_id, site, federation, reason)
    _audit(
        store,
        federation,
        "key-revoke",
        KEYS_SUBJECT,
        reason.strip(),
        {"site": site, "key_id": key_id},
    )
    return updated


SIGNATURE_REJECTIONS = (
    RejectReason.UNSIGNED.value,
    RejectReason.UNKNOWN_KEY.value,
    RejectReason.FORGED.value,
)


def audit_signature_rejections(
    store: ObjectStore,
    federation: str,
    model: str,
    run_id: str,
    round_: int,
    rejected: Mapping[str, str],
) -> int:
    """Append an ``update-rejected`` audit entry for every update in ``rejected`` (site →
    "reason: detail") that failed its signature check (unsigned, unknown or revoked key,
    forged): someone may be impersonating the site. Other rejections stay in the round
    table and the log. Returns the number of entries written."""
    written = 0
    for site, why in sorted(rejected.items()):
        check = why.split(":", 1)[0]
        if check in SIGNATURE_REJECTIONS:
            details = {"site": site, "run_id": run_id, "round": round_, "check": check}
            written += _audit(store, federation, "update-rejected", model, why[:500], details)
    return written
