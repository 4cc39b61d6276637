"""The coordinator's registry of site public keys, in the object store.

Each site's :class:`~fedround.tasks.core.signing.KeyRing` lies at
``<federation>/registry/site-keys/<site>.json``, outside every site's write prefix: only
the coordinator (or an operator with its credentials) registers or rotates keys.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from fedround.tasks.core import keys
from fedround.tasks.core.errors import ObjectNotFound
from fedround.tasks.core.limits import UPDATE_MANIFEST_MAX_BYTES
from fedround.tasks.core.signing import KeyRing, RegisteredKey
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)


def load_key_ring(store: ObjectStore, federation: str, site: str) -> KeyRing:
    """The site's registered keys (an empty ring when none are)."""
    try:
        raw = store.get(keys.site_keys_key(federation, site), max_bytes=UPDATE_MANIFEST_MAX_BYTES)
    except ObjectNotFound:
        return KeyRing(site=site)
    return KeyRing.from_json(raw)


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


def register_key(
    store: ObjectStore,
    federation: str,
    site: str,
    key: RegisteredKey,
    overlap: timedelta | None = None,
) -> KeyRing:
    """Add ``key`` to the site's ring; with ``overlap`` (a rotation) every other key still
    valid stays valid only that much longer. Registering a key twice changes nothing."""
    ring = load_key_ring(store, federation, site)
    if overlap is None and any(k.key_id == key.key_id for k in ring.keys):
        return ring
    now = datetime.now(UTC)
    stamped = key.model_copy(update={"registered_at": now})
    updated = ring.with_key(stamped, now + overlap if overlap is not None else None)
    store.put(keys.site_keys_key(federation, site), updated.to_json())
    log.info("registered key %s for site %s of %s", key.key_id, site, federation)
    return updated
