"""``mode: async``: FedBuff's buffered asynchronous rounds over the sites' round protocol.

Sites train continuously. Each is sent the latest global version through the same
protocol as a synchronous round (publish the global model, announce a spec with its
nonce, one ``site-round`` task run per training, the update validated against that nonce
before anything is done with it), but nobody waits for a round's slowest site: every
arriving update is validated and folded into the FedBuff buffer
(:class:`~fedround.tasks.core.strategies.BufferedAsync`), weighted by its staleness, and
after every K accepted updates the coordinator makes a new global version, evaluates it,
checkpoints it (weights, the server optimizer's state, the reputation record) and sends
it to the sites that are idle. An update more than ``async.max_staleness`` versions old
is rejected and reported. ``rounds`` counts global versions; version v is checkpointed as
round v, so ``fedround run --run-id`` resumes an async run like a synchronous one (the
updates in flight at a crash are lost, nothing else). The updates still in flight when the
last version is made are verified and recorded with it, not used.

A site trains at most once on each global version (a fast site cannot fill a buffer on
its own); a site whose training fails, or that is down, waits for the next version
before it is sent work again. When no site is left to train, the run ends with
:class:`QuorumNotReached`, naming every site's reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed

from fedround.flows.dispatch import current_dispatcher, failure_reason
from fedround.flows.round_artifacts import publish_round_table
from fedround.flows.training import (
    CHECKPOINTED_COUNTS,
    RoundSummary,
    RunContext,
    _call,
    _named,
    checkpoint,
    evaluate_global,
    publish_global,
    round_spec,
    site_figures,
    site_round,
)
from fedround.site_workers.site_round import RoundSpec, SiteRoundResult
from fedround.tasks import run_context
from fedround.tasks.aggregation import read_update, rejection
from fedround.tasks.checkpoints import load_checkpoint
from fedround.tasks.core.errors import ObjectStoreError, QuorumNotReached, UpdateRejected
from fedround.tasks.core.manifest import GlobalManifest, UpdateManifest
from fedround.tasks.core.reputation import Reputation, split_state
from fedround.tasks.core.round_table import SiteFigures, site_rows
from fedround.tasks.core.strategies import BufferedAsync, NormClipping, build_optimizer
from fedround.tasks.core.validation import UpdateExpectation, tensor_specs
from fedround.tasks.object_store import ObjectStore, open_store
from fedround.tasks.site_keys import audit_signature_rejections, signing_keys
from fedround.tasks.site_storage import site_over_quota
from fedround.tasks.tracking import RunTracker

FEDBUFF_STATE = "fedbuff"


@dataclass
class _Training:
    """One site training on one global version."""

    spec: RoundSpec
    base: int  # the version it trains on
    future: PrefectFuture[SiteRoundResult]


@dataclass
class _Version:
    """What happened while one global version was being filled."""

    started: float = field(default_factory=time.perf_counter)
    dispatched: list[str] = field(default_factory=list)
    accepted: dict[str, int] = field(default_factory=dict)  # site → examples
    rejected: dict[str, str] = field(default_factory=dict)
    stale: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)
    struck: set[str] = field(default_factory=set)
    staleness: list[int] = field(default_factory=list)
    bytes_up: int = 0
    bytes_up_dense: float = 0.0
    bytes_down: int = 0
    train_seconds: float = 0.0  # the slowest accepted training
    train_seconds_total: float = 0.0
    figures: dict[str, SiteFigures] = field(default_factory=dict)  # accepted sites' rows


def buffered_strategy(ctx: RunContext, state: dict[str, Any], weights: Any) -> BufferedAsync:
    """The run's FedBuff server, resumed from a checkpoint's strategy state."""
    config = ctx.config
    clip = config.strategy.clip
    buffered = BufferedAsync(
        weights,
        buffer_size=config.async_.buffer_size,
        max_staleness=config.async_.max_staleness,
        staleness_exponent=config.async_.staleness_exponent,
        optimizer=build_optimizer(config.strategy),
        clipping=NormClipping(clip.mode, clip.effective_multiplier, clip.bound),
        norm_window=max(20, 2 * config.async_.buffer_size),
    )
    if FEDBUFF_STATE in state:
        buffered.load_state_dict(state[FEDBUFF_STATE], weights)
    return buffered


def run_versions(ctx: RunContext, first: int) -> Iterator[RoundSummary]:
    """Global versions ``first`` … ``config.rounds``, one summary as each is committed."""
    logger = get_run_logger()
    config = ctx.config
    dispatcher = current_dispatcher.get()
    store = open_store(ctx.settings.object_store)
    start = load_checkpoint(store, config.federation, ctx.run_id, first - 1)
    own_state, _ = split_state(start.strategy_state)
    buffered = buffered_strategy(ctx, own_state, start.weights)
    if buffered.version != first - 1:
        raise ValueError(
            f"checkpoint round {first - 1} holds FedBuff version {buffered.version}: "
            "the run's checkpoints are inconsistent"
        )
    reputation = Reputation.from_state(config.strategy.reputation, start.strategy_state)
    tensors = tensor_specs(start.weights)
    deadline_s = config.selection.deadline_s
    published: dict[int, GlobalManifest] = {}
    trained_on: dict[str, int] = {}  # site → the last version it was sent
    parked: dict[str, tuple[int, str]] = {}  # site → (version it waits past, reason)
    training: dict[str, _Training] = {}
    now = _Version()

    def publish(version: int) -> None:
        run_context.update(round=version + 1)
        published[version] = publish_global(
            store, ctx, version + 1, buffered.weights, time.time() + deadline_s
        )
        for old in [v for v in published if v < version - config.async_.max_staleness]:
            del published[old]

    def fill() -> None:
        """Send the current version to idle sites until ``concurrency`` are training."""
        version = buffered.version
        left_out = reputation.left_out(ctx.eligible, config.async_.buffer_size)
        idle = [
            site
            for site in ctx.eligible
            if site not in training
            and site not in left_out
            and trained_on.get(site, -1) < version
            and parked.get(site, (-1, ""))[0] < version
        ]
        idle.sort(key=lambda site: (trained_on.get(site, -1), site))  # longest waiting first
        for site in idle:  # a site left out here does not take a training slot
            if len(training) >= config.async_concurrency:
                break
            over_quota = site_over_quota(store, config.federation, site, config.limits)
            if over_quota is not None:
                trained_on[site] = version
                parked[site] = (version, over_quota)
                now.failed[site] = over_quota
                logger.warning("site %s left out of version %d: %s", site, version + 1, over_quota)
                continue
            announced = published[version]
            spec = round_spec(ctx, version + 1, site, announced).model_copy(
                update={"dispatched_at": time.time()}
            )
            down = dispatcher.announce_round(
                version + 1, announced.nonce, [spec], time.time() + deadline_s
            )
            trained_on[site] = version
            if down:
                parked[site] = (version, "skipped: its site is down")
                now.failed[site] = parked[site][1]
                continue
            now.dispatched.append(site)
            future = _named(site_round, version + 1, site).submit(spec, deadline_s)
            training[site] = _Training(spec, version, future)

    def stalled() -> QuorumNotReached:
        reasons = {
            **{site: why for site, (_, why) in parked.items()},
            **reputation.left_out(ctx.eligible, config.async_.buffer_size),
        }
        return QuorumNotReached(
            f"version {buffered.version + 1}: no site is left to train "
            f"({buffered.buffered} of K={config.async_.buffer_size} updates buffered); "
            + "; ".join(f"{s} ({why})" for s, why in sorted(reasons.items()))
        )

    def take(finished: PrefectFuture[SiteRoundResult]) -> tuple[str, _Training]:
        """The site whose training ``finished``, and that training, no longer in flight."""
        site = next(s for s, t in training.items() if t.future is finished)
        return site, training.pop(site)

    def verified(site: str, job: _Training) -> tuple[UpdateManifest, Any, SiteRoundResult] | None:
        """The site's finished training as a verified update, or ``None`` with why in ``now``."""
        finished = job.future
        reason = _failure(finished)
        if reason is not None:
            now.failed[site] = reason
            parked[site] = (buffered.version, reason)
            logger.warning("site %s (version %d): %s", site, job.base, reason)
            return None
        result = finished.result()
        assert isinstance(result, SiteRoundResult)
        expectation = UpdateExpectation(
            federation=config.federation,
            run_id=ctx.run_id,
            round=job.base + 1,
            nonce=job.spec.nonce,
            site=site,
            specs=tensors,
            max_bytes=config.limits.max_update_bytes,
            max_num_examples=ctx.max_examples.get(site, 1),
            max_norm=config.limits.max_update_norm,
            signing_keys=signing_keys(
                store, config.federation, [site], config.limits.require_signatures
            )[site],
        )
        try:
            manifest, delta = read_update(store, expectation)
        except (UpdateRejected, ObjectStoreError) as exc:
            now.rejected[site] = rejection(site, exc)
            audit_signature_rejections(
                store,
                config.federation,
                config.model_name,
                ctx.run_id,
                job.base + 1,
                {site: now.rejected[site]},
            )
            if isinstance(exc, UpdateRejected):  # a verdict on the site, unlike a store error
                now.checked.add(site)
                now.struck.add(site)
            return None
        now.checked.add(site)
        return manifest, delta, result

    def drain() -> None:
        """Verify and record the updates still in flight when the last version is made.

        Their trainings run to completion either way (a flow waits for its tasks), so
        each is verified like any other and recorded with the last version: a rejected
        one is audited, a valid one is reported as arriving too late to be used.
        """
        for finished in as_completed([t.future for t in training.values()]):
            site, job = take(finished)
            if verified(site, job) is not None:
                now.stale[f"{site} (version {job.base})"] = (
                    f"verified, not used: it arrived after version {config.rounds}, the last, "
                    "was made"
                )

    publish(buffered.version)
    while buffered.version < config.rounds:
        fill()
        if not training:
            raise stalled()
        site, job = take(next(as_completed([t.future for t in training.values()])))
        update = verified(site, job)
        if update is None:
            continue
        manifest, delta, result = update
        submission = buffered.submit(delta, job.base)
        del delta, update
        if not submission.accepted:
            now.stale[f"{site} (version {job.base})"] = f"rejected: {submission.reason}"
            logger.warning("site %s: update rejected: %s", site, submission.reason)
            continue
        if submission.clip_factor < 1.0:
            now.struck.add(site)
            logger.info("clipped the update of site %s to %.3g", site, submission.clip_factor)
        now.accepted[site] = now.accepted.get(site, 0) + manifest.num_examples
        now.staleness.append(submission.staleness)
        now.bytes_up += result.nbytes_up
        now.bytes_up_dense += result.metrics.get("bytes_up_dense", 0.0)
        now.bytes_down += result.nbytes_down
        trained = result.metrics.get("train_seconds", 0.0)
        now.train_seconds = max(now.train_seconds, trained)
        now.train_seconds_total += trained
        now.figures[site] = site_figures(result)
        if submission.applied:
            if buffered.version >= config.rounds:
                drain()
            yield _commit(ctx, store, buffered, reputation, now, config.rounds)
            if buffered.version < config.rounds:
                publish(buffered.version)
            now = _Version()


def _failure(finished: PrefectFuture[SiteRoundResult]) -> str | None:
    """Why a site's training gave no update (``None`` when it did)."""
    outcome = finished.result(raise_on_failure=False)
    if isinstance(outcome, SiteRoundResult):
        return None if outcome.ok else (outcome.error or "site reported failure")
    return failure_reason(outcome)


def _commit(
    ctx: RunContext,
    store: ObjectStore,
    buffered: BufferedAsync,
    reputation: Reputation,
    version: _Version,
    rounds: int,
) -> RoundSummary:
    """Evaluate, checkpoint and log the global version ``buffered`` just made."""
    config = ctx.config
    number = buffered.version
    reputation.record(number, sorted(version.checked), sorted(version.struck))
    state = reputation.with_state({FEDBUFF_STATE: buffered.state_dict()})
    evaluation = _call(evaluate_global, number, "evaluate", ctx, buffered.weights)
    metrics: dict[str, float] = {
        "sites_selected": float(len(version.dispatched)),
        "sites_accepted": float(len(version.accepted)),
        "examples": float(sum(version.accepted.values())),
        "bytes_up": float(version.bytes_up),
        "bytes_up_dense": version.bytes_up_dense,
        "bytes_down": float(version.bytes_down),
    }
    assert set(metrics) == CHECKPOINTED_COUNTS
    if evaluation is not None:
        metrics.update(evaluation)
    committed = _call(
        checkpoint,
        number,
        "checkpoint",
        ctx,
        number,
        buffered.weights,
        state,
        metrics,
        sorted(version.accepted),
    )
    seconds = time.perf_counter() - version.started
    metrics.update(
        {
            "round_seconds": seconds,
            "slowest_site_train_seconds": version.train_seconds,
            "train_seconds_total": version.train_seconds_total,
            "staleness_mean": sum(version.staleness) / len(version.staleness),
            "staleness_max": float(max(version.staleness)),
            "updates_rejected_stale": float(len(version.stale)),
        }
    )
    tracker = RunTracker(ctx.settings.tracking_uri, ctx.mlflow_run_id)
    tracker.log_metrics({**metrics, **reputation.metrics(version.checked)}, step=number, wait=False)
    get_run_logger().info(
        "version %d/%d: %d updates (staleness ≤ %d), %s %s",
        number,
        rounds,
        len(version.staleness),
        max(version.staleness),
        config.evaluation.metric,
        metrics.get(config.evaluation.metric),
    )
    rows = site_rows(
        selected=version.dispatched,
        accepted=version.accepted,
        rejected=version.rejected,
        failed=version.failed,
        late=version.stale,
        left_out={},
        excluded=ctx.excluded,
        figures=version.figures,
    )
    publish_round_table(config.federation, ctx.run_id, number, rows)
    return RoundSummary(
        round=number,
        selected=version.dispatched,
        sites=rows,
        accepted=version.accepted,
        rejected=version.rejected,
        failed=version.failed,
        late=version.stale,
        strikes={site: reputation.strikes(site) for site in sorted(reputation.history)},
        flagged=reputation.flagged(),
        metrics=metrics,
        seconds=seconds,
        checkpoint_sha256=committed.weights_sha256,
    )
