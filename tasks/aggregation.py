"""Validate site updates and fold them into the strategy, one at a time.

Updates are folded in in site order (so the floating-point sum, and therefore the new
global model, is the same on every run), each validated, accumulated and dropped; a few
are fetched ahead in parallel. Memory stays O(window × model) whatever the number of
sites. A rejected update is data: it is recorded with its reason and left out.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from fedround.tasks.core import keys
from fedround.tasks.core.errors import ObjectStoreError, RejectReason, UpdateRejected
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.strategy import Strategy
from fedround.tasks.core.validation import UpdateExpectation, validate_update
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class AggregationOutcome:
    weights: Weights | None
    accepted: dict[str, int] = field(default_factory=dict)  # site → num_examples
    rejected: dict[str, str] = field(default_factory=dict)  # site → "reason: detail"
    manifests: dict[str, UpdateManifest] = field(default_factory=dict)

    @property
    def total_examples(self) -> int:
        return sum(self.accepted.values())


def read_update(store: ObjectStore, expected: UpdateExpectation) -> tuple[UpdateManifest, Weights]:
    """Fetch and validate one site's update for the open round."""
    manifest_key = keys.update_manifest_key(
        expected.federation, expected.run_id, expected.round, expected.site
    )
    update_key = keys.update_key(
        expected.federation, expected.run_id, expected.round, expected.site
    )
    try:
        manifest = UpdateManifest.from_json(store.get(manifest_key))
    except ValueError as exc:
        raise UpdateRejected(RejectReason.MALFORMED, f"manifest is not valid: {exc}") from exc
    size = store.size(update_key)
    if size > expected.max_bytes:  # refuse before downloading it
        raise UpdateRejected(
            RejectReason.TOO_LARGE, f"{size} bytes exceeds the limit {expected.max_bytes}"
        )
    return manifest, validate_update(manifest, store.get(update_key), expected)


def _prefetched(
    store: ObjectStore, expectations: Mapping[str, UpdateExpectation], window: int
) -> Iterator[tuple[str, Future[tuple[UpdateManifest, Weights]]]]:
    """Sites in sorted order, each with its update being fetched and validated; at most
    ``window`` are in flight or waiting, so memory stays bounded whatever the site count."""
    sites = sorted(expectations)
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="fedround-fetch") as pool:
        pending: deque[tuple[str, Future[tuple[UpdateManifest, Weights]]]] = deque()
        for site in sites:
            pending.append((site, pool.submit(read_update, store, expectations[site])))
            if len(pending) >= window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def aggregate_updates(
    store: ObjectStore,
    strategy: Strategy,
    global_weights: Weights,
    expectations: Mapping[str, UpdateExpectation],
    window: int = 4,
) -> AggregationOutcome:
    """Validate and accumulate the updates of ``expectations``' sites, in sorted site order.

    Up to ``window`` updates are fetched and validated ahead, in parallel (object-store
    round trips dominate on a real S3 server); they are folded in one at a time, in order.
    """
    outcome = AggregationOutcome(weights=None)
    strategy.begin_round(global_weights)
    for site, fetched in _prefetched(store, expectations, window):
        try:
            manifest, delta = fetched.result()
        except UpdateRejected as exc:
            outcome.rejected[site] = str(exc)
            log.warning("rejected update from site %s: %s", site, exc)
            continue
        except ObjectStoreError as exc:
            outcome.rejected[site] = f"unreadable: {exc}"
            log.warning("could not read the update of site %s: %s", site, exc)
            continue
        strategy.accumulate(delta, manifest.num_examples)
        outcome.accepted[site] = manifest.num_examples
        outcome.manifests[site] = manifest
        del delta, fetched
    if outcome.accepted:
        outcome.weights = strategy.finish()
    return outcome
