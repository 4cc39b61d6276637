"""Validate site updates and fold them into the strategy, in site order.

Updates are folded in in sorted site order (so the floating-point sum, and therefore the
new global model, is the same on every run), each validated, folded and dropped; a few
are fetched ahead in parallel. A rejected update is data: it is recorded with its reason
and left out.

Passes and memory. A streaming strategy (the mean, under any server optimizer) folds each
update as it arrives: O(window × model) whatever the number of sites. When its rules need
the whole round first (clipping to a multiple of the round's median norm, a per-site
weight cap) it gets two passes: the first validates every update and previews it (the
strategy keeps its norm and count), the second folds them. Updates from the first pass
are kept for the second up to ``cache_bytes`` (a small federation's whole round fits);
the rest are read again, pinned to the digest the first pass validated, so both passes see
the same bytes. Memory: O(window × model) + ``cache_bytes``. The robust aggregators
(median, trimmed mean, Krum) hold the round's updates themselves: O(n × model), n bounded
by ``strategy.max_buffered_updates``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from fedround.tasks.core import keys
from fedround.tasks.core.errors import (
    ObjectStoreError,
    ObjectTooLarge,
    RejectReason,
    UpdateRejected,
)
from fedround.tasks.core.limits import UPDATE_MANIFEST_MAX_BYTES
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.strategies import AggregationError, Strategy
from fedround.tasks.core.validation import UpdateExpectation, check_signature, validate_update
from fedround.tasks.object_store import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
UNREADABLE = "unreadable: "  # how a rejection for an object-store error begins

Fetched = tuple[UpdateManifest, Weights]


@dataclass
class AggregationOutcome:
    weights: Weights | None
    accepted: dict[str, int] = field(default_factory=dict)  # site → num_examples
    rejected: dict[str, str] = field(default_factory=dict)  # site → "reason: detail"
    manifests: dict[str, UpdateManifest] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)  # site → clipping factor (< 1)
    unselected: list[str] = field(default_factory=list)  # accepted, left out by Krum
    stats: dict[str, float] = field(default_factory=dict)  # median_update_norm, clip_bound
    error: str | None = None  # why valid updates gave no new model (e.g. Krum's n > 2f + 2)
    # Secure aggregation: sites that trained but dropped out of a later step (site → why).
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def total_examples(self) -> int:
        return sum(self.accepted.values())

    @property
    def checked(self) -> list[str]:
        """Sites whose update was judged: accepted, or rejected for what it was (an update
        that could not be read is no verdict on the site)."""
        judged = [s for s, why in self.rejected.items() if not why.startswith(UNREADABLE)]
        return sorted({*self.accepted, *judged})

    @property
    def struck(self) -> list[str]:
        """Sites whose update counts against their reputation: rejected, clipped, or left
        out by Krum / Multi-Krum."""
        checked = set(self.checked)
        return sorted(s for s in {*self.rejected, *self.clipped, *self.unselected} if s in checked)


def read_update(
    store: ObjectStore, expected: UpdateExpectation, manifest: UpdateManifest | None = None
) -> Fetched:
    """Fetch and validate one site's update for the open round (against ``manifest``
    when given: a second read must have the digest the first one validated)."""
    update_key = keys.update_key(
        expected.federation, expected.run_id, expected.round, expected.site
    )
    if manifest is None:
        manifest_key = keys.update_manifest_key(
            expected.federation, expected.run_id, expected.round, expected.site
        )
        try:
            raw = store.get(manifest_key, max_bytes=UPDATE_MANIFEST_MAX_BYTES)
            manifest = UpdateManifest.from_json(raw)
        except ObjectTooLarge as exc:
            raise UpdateRejected(RejectReason.MALFORMED, f"manifest: {exc}") from exc
        except ValueError as exc:
            raise UpdateRejected(RejectReason.MALFORMED, f"manifest is not valid: {exc}") from exc
        check_signature(manifest, expected)  # before anything else is read or trusted
    try:  # one bounded read: never the whole of an oversized object, no size-then-read race
        payload = store.get(update_key, max_bytes=expected.max_bytes)
    except ObjectTooLarge as exc:
        raise UpdateRejected(
            RejectReason.TOO_LARGE, f"larger than the limit of {expected.max_bytes} bytes"
        ) from exc
    return manifest, validate_update(manifest, payload, expected)


def rejection(site: str, exc: UpdateRejected | ObjectStoreError) -> str:
    """Log why ``site``'s update was not read and return the reason to record: the
    rejection, or ``unreadable: …`` when the store failed (no verdict on the site)."""
    if isinstance(exc, UpdateRejected):
        log.warning("rejected update from site %s: %s", site, exc)
        return str(exc)
    log.warning("could not read the update of site %s: %s", site, exc)
    return f"{UNREADABLE}{exc}"


def _prefetched(
    sites: Sequence[str], fetch: Callable[[str], Fetched], window: int
) -> Iterator[tuple[str, Future[Fetched]]]:
    """``sites`` in order, each with its update being fetched and validated; at most
    ``window`` are in flight or waiting, so memory stays bounded whatever the site count."""
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="fedround-fetch") as pool:
        pending: deque[tuple[str, Future[Fetched]]] = deque()
        for site in sites:
            pending.append((site, pool.submit(fetch, site)))
            if len(pending) >= window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def _valid_updates(
    store: ObjectStore,
    expectations: Mapping[str, UpdateExpectation],
    window: int,
    outcome: AggregationOutcome,
) -> Iterator[tuple[str, UpdateManifest, Weights]]:
    """Every site's validated update in sorted site order; rejections go to ``outcome``."""

    def fetch(site: str) -> Fetched:
        return read_update(store, expectations[site])

    for site, fetched in _prefetched(sorted(expectations), fetch, window):
        try:
            manifest, delta = fetched.result()
        except (UpdateRejected, ObjectStoreError) as exc:
            outcome.rejected[site] = rejection(site, exc)
            continue
        outcome.accepted[site] = manifest.num_examples
        outcome.manifests[site] = manifest
        yield site, manifest, delta


def _nbytes(weights: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


def aggregate_updates(
    store: ObjectStore,
    strategy: Strategy,
    global_weights: Weights,
    expectations: Mapping[str, UpdateExpectation],
    window: int = 4,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> AggregationOutcome:
    """Validate and aggregate the updates of ``expectations``' sites, in sorted site order.

    Up to ``window`` updates are fetched and validated ahead, in parallel (object-store
    round trips dominate on a real S3 server); they are folded in one at a time, in order.
    """
    outcome = AggregationOutcome(weights=None)
    strategy.begin_round(global_weights)
    if not strategy.needs_preview:
        for _, manifest, delta in _valid_updates(store, expectations, window, outcome):
            strategy.accumulate(delta, manifest.num_examples)
            del delta
        return _finished(strategy, outcome)

    cache: dict[str, Weights] = {}
    cached = 0
    for site, manifest, delta in _valid_updates(store, expectations, window, outcome):
        strategy.preview(delta, manifest.num_examples)
        if cached + _nbytes(delta) <= cache_bytes:
            cache[site] = delta
            cached += _nbytes(delta)
        del delta

    def again(site: str) -> Fetched:
        if site in cache:
            return outcome.manifests[site], cache.pop(site)
        return read_update(store, expectations[site], outcome.manifests[site])

    for site, fetched in _prefetched(list(outcome.accepted), again, window):
        try:
            _, delta = fetched.result()
        except (UpdateRejected, ObjectStoreError) as exc:
            # The site replaced or removed its update between the passes: start the
            # round again without it (at most once per site).
            log.warning("the update of site %s changed during aggregation: %s", site, exc)
            rest = {s: e for s, e in expectations.items() if s != site}
            retried = aggregate_updates(store, strategy, global_weights, rest, window, cache_bytes)
            retried.rejected[site] = f"changed during aggregation: {exc}"
            return retried
        strategy.accumulate(delta, outcome.accepted[site])
        del delta
    return _finished(strategy, outcome)


def _finished(strategy: Strategy, outcome: AggregationOutcome) -> AggregationOutcome:
    """Close the round (if any update was valid) and record what the strategy did."""
    if not outcome.accepted:
        return outcome
    try:
        outcome.weights = strategy.finish()
    except AggregationError as exc:
        outcome.error = str(exc)
        log.warning("no new global model this round: %s", exc)
        return outcome
    sites = list(outcome.accepted)
    report = strategy.report
    outcome.clipped = {s: f for s, f in zip(sites, report.scales, strict=False) if f < 1.0}
    if report.selected is not None:
        chosen = {sites[i] for i in report.selected}
        outcome.unselected = [s for s in sites if s not in chosen]
    if report.median_norm is not None:
        outcome.stats["median_update_norm"] = report.median_norm
    if report.clip_bound is not None:
        outcome.stats["clip_bound"] = report.clip_bound
    outcome.stats["sites_clipped"] = float(len(outcome.clipped))
    for site, factor in outcome.clipped.items():
        log.info("clipped the update of site %s to %.3g of its norm", site, factor)
    return outcome
