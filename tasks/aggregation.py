"""Validate site updates and fold them into the strategy, one at a time.

Updates are read from the object store in site order (so the floating-point sum, and
therefore the new global model, is the same on every run), validated, accumulated and
dropped: memory stays O(model) whatever the number of sites. A rejected update is data:
it is recorded with its reason and left out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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


def aggregate_updates(
    store: ObjectStore,
    strategy: Strategy,
    global_weights: Weights,
    expectations: Mapping[str, UpdateExpectation],
) -> AggregationOutcome:
    """Validate and accumulate the updates of ``expectations``' sites, in sorted site order."""
    outcome = AggregationOutcome(weights=None)
    strategy.begin_round(global_weights)
    for site in sorted(expectations):
        try:
            manifest, delta = read_update(store, expectations[site])
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
        del delta
    if outcome.accepted:
        outcome.weights = strategy.finish()
    return outcome
