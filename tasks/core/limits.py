"""How many bytes the coordinator reads of each kind of object that a site writes.

A site is not trusted: every object under a site-writable prefix is read with one of these
limits (:meth:`fedround.tasks.object_store.ObjectStore.get` with ``max_bytes``), so a
multi-gigabyte "heartbeat" cannot exhaust the coordinator's memory. An object over its
limit leaves that site out with the reason; it never fails the run. Updates have their own
limit, ``limits.max_update_bytes`` in the federation's config.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB

SESSION_STATE_MAX_BYTES = 64 * KIB  # a session's heartbeat object
SITE_ERROR_MAX_BYTES = 64 * KIB  # a round's error.json
UPDATE_MANIFEST_MAX_BYTES = 1 * MIB  # an update's manifest (digest, counts, metrics)
CONTRACT_REPORT_MAX_BYTES = 16 * MIB  # rule results and a table's set-up summary
EVALUATION_RESULT_MAX_BYTES = 1 * MIB  # a site's metrics of a model
DISPATCH_KEYS_MAX_BYTES = 64 * KIB  # the coordinator's public dispatch keys, as a site reads them
