"""The coordinator's public dispatch keys as published in the object store.

The coordinator writes them (:mod:`fedround.flows.dispatch_key`) and every site's worker
reads them (:mod:`fedround.site_workers.dispatch_check`); both read them here, with the
same size limit and the same parsing.
"""

from __future__ import annotations

from fedround.tasks.core import keys
from fedround.tasks.core.dispatch_seal import DispatchKeys
from fedround.tasks.core.limits import DISPATCH_KEYS_MAX_BYTES
from fedround.tasks.object_store import ObjectStore


def read_dispatch_keys(store: ObjectStore, federation: str) -> DispatchKeys:
    """The published keys of ``federation``'s coordinator, read with a size limit.

    Raises :class:`~fedround.tasks.core.errors.ObjectNotFound` when none are published,
    :class:`~fedround.tasks.core.errors.ObjectTooLarge` or :class:`ValueError` (a
    pydantic ``ValidationError`` included) when the object is unusable."""
    data = store.get(keys.dispatch_keys_key(federation), max_bytes=DISPATCH_KEYS_MAX_BYTES)
    return DispatchKeys.from_json(data)
