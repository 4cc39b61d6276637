"""The coordinator flow: one federated training run, one round after another.

``train_federation`` (a Prefect flow) loads the typed config, resumes from the last
committed checkpoint, has every site check its data contract, then runs the rounds:
select sites → publish the global model → one ``site-round`` task per site → validate and
aggregate → evaluate → checkpoint → log. Each round's task runs are named and tagged by
round (``round 7 · site-03``), so the Prefect UI lists them together; a progress
artifact tracks the rounds. After the last round the global model is registered in MLflow
with alias ``candidate``.

Rounds are task groups rather than sub-flow runs on purpose: a Prefect 3.8 sub-flow run
costs about 1.1 s here (its heartbeat thread is joined with 1 s granularity), more than a
whole round of the demo, while a task run costs about 10 ms.
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field
from tqdm import tqdm

from fedround.flows.dispatch import current_dispatcher, failure_reason, settle
from fedround.flows.federated_eval import evaluate_final, log_evaluation, record_label_skew
from fedround.flows.round_artifacts import (
    mlflow_ui_url,
    model_url,
    publish_round_table,
    publish_run_summary,
)
from fedround.flows.secure_round import ABORTED as SECURE_ABORTED
from fedround.flows.secure_round import secure_aggregate, secure_round, secure_tags
from fedround.site_workers.data import load_dataset
from fedround.site_workers.dp_sgd import check_private_model
from fedround.site_workers.site_round import RoundSpec, SiteRoundResult, evaluate_model
from fedround.tasks import alerts, run_context
from fedround.tasks.aggregation import AggregationOutcome, aggregate_updates
from fedround.tasks.checkpoints import (
    Checkpoint,
    committed_rounds,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from fedround.tasks.control_variate import publish_control
from fedround.tasks.core import keys
from fedround.tasks.core.config import (
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    StrategyConfig,
    load_contract_suite,
    load_federation_config,
)
from fedround.tasks.core.contract_report import ContractReport, classify_reports
from fedround.tasks.core.errors import (
    ConfigError,
    ObjectNotFound,
    ObjectStoreError,
    ObjectTooLarge,
    QuorumNotReached,
    UpdateRejected,
)
from fedround.tasks.core.federated_eval import evaluating_sites, without_eval
from fedround.tasks.core.limits import UPDATE_MANIFEST_MAX_BYTES
from fedround.tasks.core.manifest import CheckpointManifest, GlobalManifest, UpdateManifest
from fedround.tasks.core.models import build_model
from fedround.tasks.core.preprocessing import Preprocessor, bound_summary, merge_summaries
from fedround.tasks.core.privacy.adaptive_clipping import AdaptiveClipping
from fedround.tasks.core.privacy.dp_fedavg import CentralDP, wrap_strategy
from fedround.tasks.core.privacy.ledger import BudgetExceeded, BudgetReached
from fedround.tasks.core.reputation import Reputation, split_state
from fedround.tasks.core.round_table import RunOverview, SiteFigures, SiteRow, site_rows
from fedround.tasks.core.secagg import SecAggAborted
from fedround.tasks.core.selection import derive_seed, select_sites
from fedround.tasks.core.serialization import Weights, sha256_hex, weights_to_bytes
from fedround.tasks.core.strategies import Strategy, build_strategy
from fedround.tasks.core.usercode import load_callable, resolve_model_config
from fedround.tasks.core.validation import UpdateExpectation, check_manifest, tensor_specs
from fedround.tasks.object_store import ObjectStore, open_store
from fedround.tasks.privacy_ledger import (
    check_before_run,
    check_record_plan,
    privacy_tags,
    record_round,
    round_fits,
)
from fedround.tasks.registry import register_candidate, registered_by_run
from fedround.tasks.retry import only_transient
from fedround.tasks.run_lineage import TrainingLineage
from fedround.tasks.run_lock import check_run_lease, hold_run_lock
from fedround.tasks.runtime import CoordinatorSettings
from fedround.tasks.site_keys import audit_signature_rejections, signing_keys
from fedround.tasks.site_storage import sites_over_quota
from fedround.tasks.tracking import RunTracker

log = logging.getLogger(__name__)


class RunContext(BaseModel):
    """Everything a round needs, fixed for the whole training run."""

    config: FederationConfig
    config_path: str
    config_sha256: str
    run_id: str
    settings: CoordinatorSettings
    mlflow_run_id: str
    eligible: list[str]
    max_examples: dict[str, int]
    # The model as every site builds it (for tables: in/out features filled in after set-up)
    model: ModelConfig
    preprocessor: Preprocessor | None = None
    preprocessing_sha256: str | None = None
    # Sites whose data contract failed at the start of the run (site → the rule it broke).
    excluded: dict[str, str] = Field(default_factory=dict)


class RoundSummary(BaseModel):
    round: int
    selected: list[str]
    accepted: dict[str, int]
    rejected: dict[str, str] = Field(default_factory=dict)
    failed: dict[str, str] = Field(default_factory=dict)
    # Updates that arrived for rounds already closed, found (and rejected) in this one.
    late: dict[str, str] = Field(default_factory=dict)
    # Reputation: sites left out of this round for their strikes (site → reason), the
    # strikes of every site with a record, and the sites flagged after this round.
    left_out: dict[str, str] = Field(default_factory=dict)
    strikes: dict[str, int] = Field(default_factory=dict)
    flagged: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    # Federated evaluation of round − 1's model by this round's sites (one round behind).
    federated: dict[str, float] = Field(default_factory=dict)
    seconds: float
    checkpoint_sha256: str
    # Every site the round touched, with its status and figures (the Prefect UI's table).
    sites: list[SiteRow] = Field(default_factory=list)


class RunResult(BaseModel):
    federation: str
    run_id: str
    rounds: int
    resumed_from_round: int
    final_metrics: dict[str, float]
    history: list[dict[str, Any]]
    sites: dict[str, Any]
    model: dict[str, str] | None
    checkpoint: dict[str, Any]
    mlflow: dict[str, str]
    prefect: dict[str, str | None]
    timings: dict[str, float]
    finished_at: str


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


# --- tasks ------------------------------------------------------------------------------


P = ParamSpec("P")
R = TypeVar("R")


@task(
    name="data-contract",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=only_transient,
)
def check_contract(site: str, federation: str, run_id: str, timeout: float) -> ContractReport:
    report = current_dispatcher.get().check_contract(site, federation, run_id, timeout)
    logger = get_run_logger()
    (logger.info if report.success else logger.warning)(report.summary())
    return report


@task(
    name="site-round",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=only_transient,
)
def site_round(spec: RoundSpec, timeout: float) -> SiteRoundResult:
    return current_dispatcher.get().run_round(spec, timeout)


# Up to this many sites a round, each site's round is a task run of its own
# (``round 7 · site-a``); a larger round waits for its sites in one task run (``round 7 ·
# 100 sites``). Every site's status, reason and figures are in the round's table artifact
# either way; a task run per site cost the coordinator about 3 ms each (py-spy, 1,000 sites,
# 100 a round) and gives a run page of thousands of task runs no one reads.
SITE_TASKS_MAX = 32
# Likewise in MLflow: above this many sites a round, each site logs one metric row
# (``site.<site>.num_examples``) and its other figures go to a JSON artifact of the round
# (``sites/round-0007.json``), not a dozen rows each (0.3 ms a row into sqlite).
SITE_METRICS_MAX = 32


@task(name="site-rounds", cache_policy=NO_CACHE)
def site_rounds(
    specs: list[RoundSpec], timeout: float
) -> dict[str, SiteRoundResult | BaseException]:
    """Wait for many sites' rounds in one task run: each site's result, or why it gave none.
    Object-store trouble is retried (twice, as :func:`site_round`'s decorator does)."""
    dispatcher = current_dispatcher.get()

    def one(spec: RoundSpec) -> SiteRoundResult:
        for delay in (1.0, 5.0, None):
            try:
                return dispatcher.run_round(spec, timeout)
            except ObjectStoreError:
                if delay is None:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    outcomes: dict[str, SiteRoundResult | BaseException] = {}
    with ThreadPoolExecutor(max_workers=min(len(specs), 128) or 1) as pool:
        futures = {spec.site: pool.submit(one, spec) for spec in specs}
        for site, future in futures.items():
            try:
                outcomes[site] = future.result()
            except Exception as exc:  # the site's failure is data for the round
                outcomes[site] = exc
    return outcomes


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate(
    store_settings: Any,
    strategy_config: StrategyConfig,
    strategy_state: dict[str, Any],
    global_weights: Weights,
    expectations: dict[str, UpdateExpectation],
    population: int | None = None,
    privacy: PrivacyConfig | None = None,
    dp_sites: int = 0,
    dp_seed: int | None = None,
) -> tuple[AggregationOutcome, dict[str, Any]]:
    """Validate the round's updates and aggregate them with the configured strategy,
    resumed from its checkpointed state (server momentum, optimizer moments, SCAFFOLD's
    control variate); ``population``: the federation's site count (SCAFFOLD's N).
    With ``privacy`` on, DP-FedAvg wraps the strategy (``dp_sites``: the round's selected
    sites, its fixed denominator; ``dp_seed``: None for secret noise)."""
    strategy = build_strategy(strategy_config, population)
    folding: Strategy = strategy
    if privacy is not None and privacy.mode in ("central", "local"):  # record: at the sites
        assert privacy.noise_multiplier is not None and privacy.clip_norm is not None
        adaptive = privacy.adaptive_clipping
        folding = wrap_strategy(
            strategy,
            privacy.mode,
            privacy.noise_multiplier,
            privacy.clip_norm,
            dp_sites,
            dp_seed,
            AdaptiveClipping(**adaptive.model_dump()) if adaptive is not None else None,
        )
    own_state = split_state(strategy_state)[0]  # the run's reputation aside
    folding.load_state_dict(own_state)  # DP's adaptive clip norm included
    outcome = aggregate_updates(open_store(store_settings), folding, global_weights, expectations)
    if outcome.clipped or outcome.unselected:
        get_run_logger().info(
            "aggregate: clipped %s (bound %.4g, median norm %.4g); left out by %s: %s",
            {site: round(factor, 3) for site, factor in outcome.clipped.items()} or "none",
            outcome.stats.get("clip_bound", float("nan")),
            outcome.stats.get("median_update_norm", float("nan")),
            strategy_config.aggregator,
            outcome.unselected or "none",
        )
    if (
        isinstance(folding, CentralDP)
        and folding.adaptive is not None
        and outcome.weights is not None
    ):
        outcome.stats["dp_clip_norm"] = folding.clip_norm
        outcome.stats["dp_next_clip_norm"] = folding.next_clip_norm
        if folding.unclipped_fraction is not None:
            outcome.stats["dp_unclipped_fraction"] = folding.unclipped_fraction
        get_run_logger().info(
            "aggregate: adaptive clipping moved C from %.4g to %.4g (noised unclipped "
            "fraction %.3g)",
            folding.clip_norm,
            folding.next_clip_norm,
            folding.unclipped_fraction,
        )
    return outcome, folding.state_dict()


def holdout_path(ctx: RunContext) -> Path | None:
    """The coordinator's own held-out file: ``evaluation.holdout`` or the demo's."""
    if ctx.config.evaluation.holdout:
        return Path(ctx.config_path).parent / ctx.config.evaluation.holdout
    demo = ctx.settings.holdout_file(ctx.config.federation)
    return demo if demo.exists() else None


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_global(ctx: RunContext, weights: Weights) -> dict[str, float] | None:
    """Central evaluation on the coordinator's held-out set (when it has one)."""
    holdout = holdout_path(ctx)
    if holdout is None:
        return None
    data = load_dataset(holdout, ctx.config.data, ctx.preprocessor)
    model = build_model(ctx.model, seed=0)
    model.load_state_dict(weights)
    return evaluate_model(
        model, data, ctx.config.evaluation, "coordinator", ctx.config.federation, holdout
    )


@task(
    name="checkpoint",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[1, 2, 5],
    retry_condition_fn=only_transient,  # a lost run lease is final
)
def checkpoint(
    ctx: RunContext,
    round_: int,
    weights: Weights,
    strategy_state: dict[str, Any],
    metrics: dict[str, float],
    sites: list[str],
) -> CheckpointManifest:
    check_run_lease(ctx.config.federation, ctx.run_id)  # one coordinator per run
    return save_checkpoint(
        open_store(ctx.settings.object_store),
        federation=ctx.config.federation,
        run_id=ctx.run_id,
        round_=round_,
        weights=weights,
        strategy=ctx.config.strategy.name,
        strategy_state=strategy_state,
        config_sha256=ctx.config_sha256,
        metrics=metrics,
        sites=sites,
    )


def publish_global(
    store: ObjectStore, ctx: RunContext, round_: int, weights: Weights, deadline: float
) -> GlobalManifest:
    """Write the round's global model and its manifest where the sites fetch them."""
    payload = weights_to_bytes(weights)
    manifest = GlobalManifest(
        federation=ctx.config.federation,
        run_id=ctx.run_id,
        round=round_,
        nonce=secrets.token_hex(8),
        sha256=sha256_hex(payload),
        nbytes=len(payload),
        deadline_at=datetime.fromtimestamp(deadline, UTC),
    )
    federation, run_id = ctx.config.federation, ctx.run_id
    store.put(keys.global_key(federation, run_id, round_), payload)
    store.put(keys.global_manifest_key(federation, run_id, round_), manifest.to_json())
    return manifest


def _collect(
    outcomes: dict[str, SiteRoundResult | BaseException],
) -> tuple[dict[str, SiteRoundResult], dict[str, str]]:
    """The sites' results and, for the others, why (site → reason): failures are data."""
    done: dict[str, SiteRoundResult] = {}
    failed: dict[str, str] = {}
    for site, outcome in outcomes.items():
        if isinstance(outcome, SiteRoundResult) and outcome.ok:
            done[site] = outcome
        elif isinstance(outcome, SiteRoundResult):
            failed[site] = outcome.error or "site reported failure"
        else:
            failed[site] = failure_reason(outcome)
    return done, failed


# --- one round --------------------------------------------------------------------------


def round_spec(
    ctx: RunContext,
    round_: int,
    site: str,
    announced: GlobalManifest,
    control_sha256: str | None = None,
    evaluate_received: bool = False,
) -> RoundSpec:
    """What ``site`` is asked to do in ``round_``: train on the global model ``announced``."""
    config = ctx.config
    return RoundSpec(
        federation=config.federation,
        run_id=ctx.run_id,
        round=round_,
        site=site,
        nonce=announced.nonce,
        global_sha256=announced.sha256,
        seed=derive_seed(config.seed, "train", round_, site),
        model=ctx.model,
        training=config.training,
        data=config.data,
        strategy=config.strategy,
        compression=config.compression,
        privacy=config.privacy,
        preprocessing_sha256=ctx.preprocessing_sha256,
        control_sha256=control_sha256,
        context=run_context.current_fields(),
        evaluation=config.evaluation,
        evaluate_received=evaluate_received,
    )


# Framework figures a site's round reports beside its own metrics (not shown as metrics).
FRAMEWORK_FIGURES = frozenset(
    {"train_seconds", "bytes_up_dense", "bytes_down", "dispatch_latency_seconds"}
)


def site_figures(result: SiteRoundResult) -> SiteFigures:
    """A site's round result as the figures of its row in the round's table."""
    return SiteFigures(
        examples=result.num_examples,
        seconds=result.seconds,
        bytes_up=result.nbytes_up,
        bytes_down=result.nbytes_down,
        metrics={k: v for k, v in result.metrics.items() if k not in FRAMEWORK_FIGURES},
    )


def _named(task_: Task[P, R], round_: int, what: str) -> Task[P, R]:
    """``task_`` with its runs named ``round N · what``.

    A shallow copy with the run name set rather than ``with_options``, which builds a new
    Task and reads the function's source again (about 1 ms) for every site in every round.
    Names, not tags: a tagged task run asks the API for tag concurrency slots (~0.3 s+).
    """
    named = copy.copy(task_)
    named.task_run_name = f"round {round_} · {what}"
    return named


def _call(task_: Task[P, R], round_: int, what: str, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``task_`` as ``round N · what`` with its arguments quoted.

    Prefect walks every argument of a task call, element by element, looking for futures
    to resolve; the run context (the whole config, per-site tables) and the weights hold
    none, and walking them cost a round about a fifth of its time at 100 sites.
    """
    named: Any = _named(task_, round_, what)
    result: R = named(*map(quote, args), **{k: quote(v) for k, v in kwargs.items()})
    return result


def reject_late_updates(
    store: ObjectStore, expected: UpdateExpectation, pending: set[tuple[int, str]]
) -> dict[str, str]:
    """Updates that arrived for rounds already closed: found, rejected, reported as
    ``{"<site> (round <r>)": reason}``.

    ``pending`` holds (round, site) pairs whose update did not arrive in time; any update
    that shows up for them later is validated against the round now open, which rejects
    it (its round and nonce are stale). Pairs older than three rounds are forgotten.
    """
    rejected: dict[str, str] = {}
    for round_, site in sorted(pending):
        key = keys.update_manifest_key(expected.federation, expected.run_id, round_, site)
        if expected.round - round_ > 3:
            pending.discard((round_, site))
            continue
        if not store.exists(key):
            continue
        pending.discard((round_, site))
        try:
            raw = store.get(key, max_bytes=UPDATE_MANIFEST_MAX_BYTES)
            check_manifest(UpdateManifest.from_json(raw), replace(expected, site=site))
        except UpdateRejected as exc:
            rejected[f"{site} (round {round_})"] = f"late update rejected: {exc}"
        except (ValueError, ObjectTooLarge) as exc:
            rejected[f"{site} (round {round_})"] = f"late update rejected: malformed ({exc})"
    return rejected


# The round figures a checkpoint records beside the central evaluation's metrics.
CHECKPOINTED_COUNTS = frozenset(
    {"sites_selected", "sites_accepted", "examples", "bytes_up", "bytes_up_dense", "bytes_down"}
)


def run_round(ctx: RunContext, round_: int, pending_late: set[tuple[int, str]]) -> RoundSummary:
    """One federated round, from the last committed checkpoint to the next.

    ``pending_late`` carries the (round, site) pairs whose update missed its deadline;
    updates arriving for them later are rejected and reported here.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    config = ctx.config
    run_context.update(round=round_)
    store = open_store(ctx.settings.object_store)
    previous = load_checkpoint(store, config.federation, ctx.run_id, round_ - 1)
    deadline = time.time() + config.selection.deadline_s
    announced = publish_global(store, ctx, round_, previous.weights, deadline)
    scaffold = config.strategy.name == "scaffold"
    control_sha256 = (
        publish_control(
            store, config.federation, ctx.run_id, round_, previous.strategy_state, previous.weights
        )
        if scaffold
        else None
    )
    reputation = Reputation.from_state(config.strategy.reputation, previous.strategy_state)
    left_out = reputation.left_out(ctx.eligible, config.selection.min_sites)
    for site, reason in left_out.items():
        logger.warning("site %s left out of round %d: %s", site, round_, reason)
    selected = select_sites(
        [site for site in ctx.eligible if site not in left_out],
        config.selection.fraction,
        max(config.selection.min_sites, config.secure_aggregation.threshold or 0)
        if config.secure_aggregation.enabled
        else config.selection.min_sites,
        config.seed,
        round_,
    )
    over = round_fits(store, config, ctx.run_id, round_, selected, ctx.max_examples)
    if over is not None:
        raise BudgetReached(f"round {round_} would exceed it: {over.refusal()}")
    over_quota = sites_over_quota(store, config.federation, selected, config.limits)
    sent = [site for site in selected if site not in over_quota]
    evaluators = set(evaluating_sites(sent, config.evaluation.federated, config.seed, round_))
    specs = [
        round_spec(ctx, round_, site, announced, control_sha256, site in evaluators)
        for site in sent
    ]
    secure, unsecurable = None, ""
    if config.secure_aggregation.enabled:
        try:
            secure = secure_round(
                config, ctx.run_id, round_, announced.nonce, sent, previous.weights
            )
            specs = [spec.model_copy(update={"secagg": secure}) for spec in specs]
        except SecAggAborted as exc:  # too few sites to reach the threshold: none is asked
            unsecurable, specs = str(exc), []
    opened = time.time()
    specs = [spec.model_copy(update={"dispatched_at": opened}) for spec in specs]
    down = current_dispatcher.get().announce_round(round_, announced.nonce, specs, deadline)
    # Largest sites first (where sites share a process, its session loop serves them in
    # that order itself; here the order is only that of the round's task runs).
    by_size = sorted(specs, key=lambda spec: -ctx.max_examples.get(spec.site, 0))
    dispatched = [spec for spec in by_size if spec.site not in down]
    if len(dispatched) <= SITE_TASKS_MAX:
        futures = {
            spec.site: _named(site_round, round_, spec.site).submit(
                spec, config.selection.deadline_s
            )
            for spec in dispatched
        }
        done, failed = _collect(settle(futures))
    else:
        outcomes = _call(
            site_rounds,
            round_,
            f"{len(dispatched)} sites",
            dispatched,
            config.selection.deadline_s,
        )
        done, failed = _collect(outcomes)
    failed.update({site: "skipped: its site is down" for site in down})
    failed.update(over_quota)  # sent nothing: logged below with the others left out
    for site, reason in failed.items():
        logger.warning("site %s left out of round %d: %s", site, round_, reason)
    tensors = tensor_specs(previous.weights, control=scaffold)
    site_keys = signing_keys(
        store, config.federation, [*done, *failed], config.limits.require_signatures
    )
    expectations = {
        site: UpdateExpectation(
            federation=config.federation,
            run_id=ctx.run_id,
            round=round_,
            nonce=announced.nonce,
            site=site,
            specs=tensors,
            max_bytes=config.limits.max_update_bytes,
            max_num_examples=ctx.max_examples.get(site, 1),
            max_norm=config.limits.max_update_norm,
            signing_keys=site_keys[site],
        )
        for site in [*done, *failed]
    }
    if unsecurable:
        outcome = AggregationOutcome(weights=None, error=f"{SECURE_ABORTED}{unsecurable}")
        strategy_state = previous.strategy_state
        logger.warning("round %d: %s", round_, outcome.error)
    elif secure is not None:
        outcome, strategy_state = _call(
            secure_aggregate,
            round_,
            "secure aggregate",
            config,
            ctx.settings.object_store,
            secure,
            done,
            {site: expectations[site] for site in done},
            previous.weights,
            previous.strategy_state,
            len(selected),
        )
    else:
        outcome, strategy_state = _call(
            aggregate,
            round_,
            "aggregate",
            ctx.settings.object_store,
            config.strategy,
            previous.strategy_state,
            previous.weights,
            {site: expectations[site] for site in done},
            population=len(config.sites),
            privacy=config.privacy,
            dp_sites=len(selected),
            dp_seed=(
                None
                if config.privacy.noise_seed is None
                else derive_seed(config.privacy.noise_seed, "dp-noise", round_)
            ),
        )
    late = {}
    if expectations:
        late = reject_late_updates(store, next(iter(expectations.values())), pending_late)
    pending_late.update((round_, site) for site in failed)
    failed.update(outcome.dropped)  # secure aggregation: uploaded their advert, then dropped
    for which, reason in late.items():
        logger.warning("site %s: %s", which, reason)
    audit_signature_rejections(
        store, config.federation, config.model_name, ctx.run_id, round_, outcome.rejected
    )
    aborted = outcome.error is not None and outcome.error.startswith(SECURE_ABORTED)
    if aborted:  # nothing applied: the round commits the model it started from
        outcome.weights = previous.weights
        failed.update({site: outcome.error or "" for site in done if site not in outcome.rejected})
    elif len(outcome.accepted) < config.selection.min_sites or outcome.weights is None:
        missing = {**failed, **outcome.rejected}
        raise QuorumNotReached(
            f"round {round_}: {len(outcome.accepted)} valid updates, quorum is "
            f"{config.selection.min_sites}; left out: "
            + "; ".join(f"{s} ({why})" for s, why in sorted(missing.items()))
        )
    flagged_before = reputation.summary()
    reputation.record(round_, outcome.checked, outcome.struck)
    strategy_state = reputation.with_state(strategy_state)  # checkpointed: resume keeps it
    evaluation = _call(evaluate_global, round_, "evaluate", ctx, outcome.weights)
    metrics: dict[str, float] = {
        "sites_selected": float(len(selected)),
        "sites_accepted": float(len(outcome.accepted)),
        "examples": float(outcome.total_examples),
        "bytes_up": float(sum(done[s].nbytes_up for s in outcome.accepted)),
        # What the same updates would have taken uncompressed (compression's ratio).
        "bytes_up_dense": float(
            sum(done[s].metrics.get("bytes_up_dense", 0.0) for s in outcome.accepted)
        ),
        "bytes_down": float(sum(done[s].nbytes_down for s in done)),
    }
    assert set(metrics) == CHECKPOINTED_COUNTS  # final_metrics tells them from evaluation's
    if evaluation is not None:
        metrics.update(evaluation)
    if aborted:
        metrics["secagg_aborted"] = 1.0
    metrics.update({k: v for k, v in outcome.stats.items() if k.startswith("secagg_")})
    if config.privacy.enabled and not aborted:  # spend, then release: before the checkpoint
        spent = record_round(store, config, ctx.run_id, round_, selected, ctx.max_examples)
        metrics["privacy_epsilon"] = spent
        metrics.update({k: v for k, v in outcome.stats.items() if k.startswith("dp_")})
        logger.info("round %d: privacy spent by this run ε=%.4g", round_, spent)
    committed = _call(
        checkpoint,
        round_,
        "checkpoint",
        ctx,
        round_,
        outcome.weights,
        strategy_state,
        metrics,
        sorted(outcome.accepted),
    )
    seconds = time.perf_counter() - started
    slowest = max(
        (done[s].metrics.get("train_seconds", 0.0) for s in outcome.accepted), default=0.0
    )
    metrics["round_seconds"] = seconds
    metrics["slowest_site_train_seconds"] = slowest
    metrics["train_seconds_total"] = sum(
        done[s].metrics.get("train_seconds", 0.0) for s in outcome.accepted
    )
    metrics["orchestration_overhead_seconds"] = seconds - slowest
    latencies = [
        done[s].metrics["dispatch_latency_seconds"]
        for s in outcome.accepted
        if "dispatch_latency_seconds" in done[s].metrics
    ]
    if latencies:
        metrics["dispatch_latency_max_seconds"] = max(latencies)
    figures = {
        site: {
            **without_eval(done[site].metrics),  # eval_*: round − 1's model, logged below
            "num_examples": float(done[site].num_examples),
            "seconds": done[site].seconds,
            "bytes_up": float(done[site].nbytes_up),
        }
        for site in outcome.accepted
    }
    tracker = RunTracker(ctx.settings.tracking_uri, ctx.mlflow_run_id)
    if len(figures) <= SITE_METRICS_MAX:
        site_metrics = {
            f"site.{site}.{name}": value
            for site, values in figures.items()
            for name, value in values.items()
        }
    else:
        site_metrics = {f"site.{s}.num_examples": v["num_examples"] for s, v in figures.items()}
        tracker.log_text(json.dumps(figures, sort_keys=True), f"sites/round-{round_:04d}.json")
    tracker.log_metrics(
        {**metrics, **site_metrics, **reputation.metrics(outcome.checked)}, step=round_, wait=False
    )
    federated = log_evaluation(
        tracker, round_ - 1, {s: done[s].metrics for s in outcome.accepted}, ctx.max_examples
    )
    if reputation.summary() != flagged_before:
        tracker.set_tags({"fedround.flagged_sites": json.dumps(reputation.summary())[:5000]})
        logger.warning("flagged sites after round %d: %s", round_, reputation.summary())
    logger.info(
        "round %d: %d/%d sites accepted, %s %s",
        round_,
        len(outcome.accepted),
        len(selected),
        config.evaluation.metric,
        metrics.get(config.evaluation.metric),
    )
    rows = site_rows(
        selected=selected,
        accepted=outcome.accepted,
        rejected=outcome.rejected,
        failed=failed,
        late=late,
        left_out=left_out,
        excluded=ctx.excluded,
        figures={site: site_figures(result) for site, result in done.items()},
    )
    publish_round_table(config.federation, ctx.run_id, round_, rows)
    return RoundSummary(
        round=round_,
        selected=selected,
        accepted=outcome.accepted,
        rejected=outcome.rejected,
        late=late,
        failed=failed,
        left_out=left_out,
        sites=rows,
        strikes={site: reputation.strikes(site) for site in sorted(reputation.history)},
        flagged=reputation.flagged(),
        metrics=metrics,
        federated=federated,
        seconds=seconds,
        checkpoint_sha256=committed.weights_sha256,
    )


# --- the training run -------------------------------------------------------------------


def _start_checkpoint(
    store: ObjectStore,
    config: FederationConfig,
    model_config: ModelConfig,
    run_id: str,
    config_sha256: str,
    initial: Weights | None = None,
) -> Checkpoint:
    """The latest committed checkpoint of this run, or a new round-0 checkpoint (from
    ``initial`` weights when fine-tuning a registered model)."""
    found = latest_checkpoint(store, config.federation, run_id)
    if found is not None:
        if found.manifest.config_sha256 != config_sha256:
            raise ConfigError(
                f"run {run_id} was started from a config with sha256 "
                f"{found.manifest.config_sha256[:12]}…, this config's is {config_sha256[:12]}…: "
                "resume it with the same config, or start a new run (omit --run-id)"
            )
        return found
    model = build_model(model_config, seed=config.seed)
    save_checkpoint(
        store,
        federation=config.federation,
        run_id=run_id,
        round_=0,
        weights=initial
        if initial is not None
        else {name: t.detach().clone() for name, t in model.state_dict().items()},
        strategy=config.strategy.name,
        strategy_state=build_strategy(config.strategy.name).state_dict(),
        config_sha256=config_sha256,
    )
    return load_checkpoint(store, config.federation, run_id, 0)


def _set_up_preprocessing(
    store: ObjectStore,
    config: FederationConfig,
    run_id: str,
    passed: dict[str, ContractReport],
    inherited: Preprocessor | None = None,
) -> tuple[Preprocessor | None, str | None]:
    """Tables: merge the passing sites' summaries (each bounded by the rows its contract
    checked) into the run's preprocessor, publish it for the sites. A resumed run keeps
    the preprocessor it started with, so its rounds stay byte-identical; a run that
    fine-tunes a registered table model keeps that model's (``inherited``)."""
    table = config.data.table
    if config.data.kind != "table" or table is None:
        return None, None
    key = keys.preprocessing_key(config.federation, run_id)
    try:
        payload = store.get(key)
        get_run_logger().info("run %s keeps its preprocessor from the first attempt", run_id)
    except ObjectNotFound:
        if inherited is not None:
            payload = inherited.model_dump_json().encode()
            store.put(key, payload)
            return inherited, sha256_hex(payload)
        summaries = [
            bound_summary(report.data_summary, table, report.row_count)
            for _, report in sorted(passed.items())
            if report.data_summary is not None
        ]
        if not summaries:
            raise QuorumNotReached(
                "no site sent a set-up summary: nothing to preprocess with"
            ) from None
        try:
            preprocessor = merge_summaries(summaries, table)
        except ValueError as exc:
            raise ConfigError(f"federated preprocessing: {exc}") from exc
        payload = preprocessor.model_dump_json().encode()
        store.put(key, payload)
    return Preprocessor.model_validate_json(payload), sha256_hex(payload)


def _check_contracts(
    config: FederationConfig, run_id: str
) -> tuple[dict[str, ContractReport], dict[str, str]]:
    """Every site checks its data; returns the passing reports and the excluded sites."""
    logger = get_run_logger()
    futures = {
        site.name: check_contract.with_options(task_run_name=f"{site.name} · data contract").submit(
            site.name, config.federation, run_id, config.selection.join_timeout_s
        )
        for site in config.sites
    }
    outcomes = settle(futures)
    passed, excluded = classify_reports(outcomes, config.limits.max_examples_per_site)
    for reason in excluded.values():
        logger.warning(reason)
    if len(passed) < config.selection.min_sites:
        raise QuorumNotReached(
            f"only {len(passed)} of {len(config.sites)} sites pass their data contract, the "
            f"quorum is {config.selection.min_sites}: " + "; ".join(excluded.values())
        )
    return passed, excluded


@flow(
    name="fedround-training",
    flow_run_name=lambda: flow_run_name(
        runtime.flow_run.parameters, runtime.flow_run.tags, runtime.flow_run.scheduled_start_time
    ),
    validate_parameters=False,
    task_runner=ThreadPoolTaskRunner(max_workers=64),  # type: ignore[arg-type]  # one thread per waiting site
)
def train_federation(
    config_path: str,
    run_id: str | None = None,
    init_from: str | None = None,
    allow_dirty: bool = False,
) -> RunResult:
    """Train one global model over the federation's sites; an existing ``run_id`` resumes
    from its last committed checkpoint.

    Site work goes to the dispatcher in ``current_dispatcher`` (the embedded CLI sets one);
    when none is set, as in a deployment run, each site's own work pool is used. Without a
    ``run_id`` the run is named after its flow run, so a Prefect retry resumes it.
    ``init_from`` (``models:/<name>@<alias>``) starts from a registered model's weights; a
    config with uncommitted changes is refused unless ``allow_dirty``.
    """
    run_id = keys.check_run_id(run_id or default_run_id())
    settings = CoordinatorSettings.from_env()
    lineage = TrainingLineage.prepare(
        Path(config_path), run_id, settings.tracking_uri, init_from, allow_dirty
    )
    run_store = open_store(settings.object_store)
    with lineage.context(), hold_run_lock(run_store, lineage.config.federation, run_id):
        dispatcher = current_dispatcher.get(None)
        if dispatcher is not None:
            return _train(config_path, run_id, lineage)
        from fedround.flows.distributed import DistributedDispatcher

        store = open_store(settings.object_store)
        token = current_dispatcher.set(DistributedDispatcher(lineage.config, store))
        try:
            return _train(config_path, run_id, lineage)
        finally:
            current_dispatcher.reset(token)


def flow_run_name(
    parameters: dict[str, Any], tags: list[str], scheduled: datetime | str | None
) -> str:
    """``mnist-demo · 2026-11-30 nightly · <run id>``: what the run is, in the Prefect UI."""
    run_id = parameters.get("run_id") or default_run_id()
    federation = "fedround"
    try:
        import yaml

        loaded = yaml.safe_load(Path(str(parameters.get("config_path"))).read_text())
        federation = str(loaded.get("federation") or federation)[:60]
    except Exception:  # the flow itself reports a bad config; the name stays generic
        pass
    if "auto-scheduled" in tags:
        kind = "nightly"
    elif runtime.deployment.id:
        kind = "on demand"
    else:
        kind = "embedded"
    when = datetime.fromisoformat(str(scheduled)) if scheduled else datetime.now(UTC)
    return f"{federation} · {when.date().isoformat()} {kind} · {run_id}"


def _tag_flow_run(config: FederationConfig) -> None:
    """Tag the flow run with its tenant and federation (filters in the Prefect UI)."""
    flow_run_id = runtime.flow_run.id
    wanted = {f"tenant:{config.tenant}", f"federation:{config.federation}"}
    if not flow_run_id or wanted <= set(runtime.flow_run.tags):
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run_id, tags=sorted(set(runtime.flow_run.tags) | wanted))
    except Exception:
        log.warning("could not tag flow run %s", flow_run_id, exc_info=True)


def default_run_id() -> str:
    """Scheduled and UI-triggered runs: named by date and flow run, stable across retries."""
    flow_run_id = runtime.flow_run.id
    day = datetime.now(UTC).strftime("%Y%m%d")
    return f"{day}-{str(flow_run_id)[:8]}" if flow_run_id else new_run_id()


def _train(config_path: str, run_id: str, lineage: TrainingLineage) -> RunResult:
    started = time.perf_counter()
    logger = get_run_logger()
    dispatcher = current_dispatcher.get()
    settings = CoordinatorSettings.from_env()
    path = Path(config_path)
    config = load_federation_config(path)
    load_callable(config.model.import_path, "model factory")  # fail before the sites start
    config_sha256 = sha256_hex(path.read_bytes())
    _tag_flow_run(config)
    store = open_store(settings.object_store)
    # Refused before it starts: a broken ledger, or a planned spend past the budget.
    check_before_run(store, config, run_id, committed_rounds(store, config.federation, run_id))
    suite = load_contract_suite(path, config)
    store.put(keys.contract_key(config.federation, run_id), json.dumps(suite).encode())
    store.put(keys.data_spec_key(config.federation, run_id), config.data.model_dump_json().encode())
    tracker = RunTracker.start(
        settings.tracking_uri,
        config,
        run_id,
        tags={
            "fedround.federation": config.federation,
            "fedround.tenant": config.tenant,
            "fedround.config_sha256": config_sha256,
            "fedround.config_path": str(path),
            "fedround.prefect_flow_run_id": str(runtime.flow_run.id),
            **lineage.run_tags(),
        },
        artifact_root=settings.state_dir / "mlartifacts"
        if settings.tracking_uri.startswith("sqlite:")
        else None,
    )
    alerts.run_started(config, run_id)
    try:
        dispatcher.open_run(run_id, [site.name for site in config.sites])
        passed, excluded = _check_contracts(config, run_id)
        # Record-level DP plans each site's spend from its example count: refused here,
        # before any site trains, if the run would overspend.
        check_record_plan(store, config, run_id, {s: r.row_count for s, r in passed.items()})
        preprocessor, preprocessing_sha256 = _set_up_preprocessing(
            store, config, run_id, passed, lineage.initial_preprocessor()
        )
        model_config = resolve_model_config(
            config.model,
            preprocessor.n_features if preprocessor else None,
            preprocessor.n_outputs if preprocessor else None,
        )
        if config.privacy.mode == "record":  # refused here, not by every site in round 1
            check_private_model(build_model(model_config, seed=config.seed))
        start = _start_checkpoint(
            store, config, model_config, run_id, config_sha256, lineage.initial_weights()
        )
        if start.round:
            logger.info("resuming run %s from checkpoint round %d", run_id, start.round)
        else:
            tracker.log_text(path.read_text(), "config/federation.yaml")
            tracker.log_text(json.dumps(suite, indent=2), "config/contract.json")
            if preprocessor is not None:
                tracker.log_text(
                    preprocessor.model_dump_json(indent=2), "config/preprocessing.json"
                )
        lineage.record_contracts(tracker, passed, excluded)
        label_skew = record_label_skew(tracker, passed)
        if excluded:
            tracker.set_tags({"fedround.excluded_sites": json.dumps(excluded)[:5000]})
        ctx = RunContext(
            config=config,
            config_path=str(path),
            config_sha256=config_sha256,
            run_id=run_id,
            settings=settings,
            mlflow_run_id=tracker.mlflow_run_id,
            eligible=sorted(passed),
            max_examples={site: report.row_count for site, report in passed.items()},
            model=model_config,
            preprocessor=preprocessor,
            preprocessing_sha256=preprocessing_sha256,
            excluded=excluded,
        )
        setup_seconds = time.perf_counter() - started
        summaries = _run_rounds(ctx, first=start.round + 1)
        # A privacy budget may stop the run early: the last committed round is its model.
        final_round = max(committed_rounds(store, config.federation, run_id))
        if final_round == 0:
            raise BudgetExceeded("the privacy budget left no round to train: nothing to register")
        final = load_checkpoint(store, config.federation, run_id, final_round)
        spent = privacy_tags(store, config, run_id)
        spent.update(
            secure_tags(config, [s.round for s in summaries if s.metrics.get("secagg_aborted")])
        )
        if spent:
            tracker.set_tags(spent)
        final_evaluation = evaluate_final(tracker, store, ctx, final.weights)
        lineage_tags, parent = lineage.version_tags(tracker)
        registered = registered_by_run(tracker) or register_candidate(
            tracker,
            config,
            final.weights,
            model_config=model_config,
            preprocessor=preprocessor,
            parent=parent,
            version_tags={
                **lineage_tags,
                "fedround.run_id": run_id,
                "fedround.config_sha256": config_sha256,
                "fedround.weights_sha256": final.manifest.weights_sha256,
                "fedround.rounds": str(final_round),
                **spent,
                "fedround.sites": ",".join(final.manifest.sites),
                "fedround.accuracy": f"{final.manifest.metrics.get('accuracy', float('nan')):.4f}",
                f"fedround.{config.evaluation.metric}": (
                    f"{final.manifest.metrics.get(config.evaluation.metric, float('nan')):.4f}"
                ),
            },
        )
    except BaseException as exc:
        dispatcher.close_run("failed")
        tracker.finish("FAILED")
        alerts.run_finished(config, run_id, ok=False, reason=f"{type(exc).__name__}: {exc}")
        raise
    dispatcher.close_run("finished")
    # A checkpoint's metrics are the round's counts plus its central evaluation.
    final_metrics = {
        k: v for k, v in final.manifest.metrics.items() if k not in CHECKPOINTED_COUNTS
    }
    final_metrics.update(final_evaluation.federated)
    tracker.log_metrics({f"final_{k}": v for k, v in final_metrics.items()}, step=config.rounds)
    lineage.finish(
        tracker, [s.model_dump(mode="json") for s in summaries], time.perf_counter() - started
    )
    tracker.finish()
    alerts.run_finished(config, run_id, ok=True, reason=None)
    timed = {s.round: s.metrics for s in summaries}  # rounds run by this process carry timings
    # federated evaluation: round r's sites scored round r − 1's model; the final pass, the last
    federated = {s.round - 1: s.federated for s in summaries if s.federated}
    federated[config.rounds] = final_evaluation.federated
    history = [
        {
            "round": r,
            **read_manifest(store, config.federation, run_id, r).metrics,
            **timed.get(r, {}),
            **federated.get(r, {}),
        }
        for r in committed_rounds(store, config.federation, run_id)
        if r > 0
    ]
    round_times = [s.seconds for s in summaries]
    participating = sorted({s for h in summaries for s in h.accepted} | set(final.manifest.sites))
    _publish_summary(
        ctx, lineage, summaries, history, final_metrics, participating, registered.__dict__
    )
    return RunResult(
        federation=config.federation,
        run_id=run_id,
        rounds=config.rounds,
        resumed_from_round=start.round,
        final_metrics=final_metrics,
        history=history,
        sites={
            "participating": participating,
            "excluded": excluded,
            "left_out_in_rounds": {
                str(s.round): {**s.left_out, **s.failed, **s.rejected}
                for s in summaries
                if s.left_out or s.failed or s.rejected
            },
            "flagged": Reputation.from_state(
                config.strategy.reputation, final.strategy_state
            ).summary(),
            "late_updates_rejected": {str(s.round): s.late for s in summaries if s.late},
            "label_skew": label_skew,
            "final_evaluation": final_evaluation.summary(),
        },
        model=registered.__dict__,
        checkpoint={
            "round": final.round,
            "uri": store.uri(keys.checkpoint_prefix(config.federation, run_id, final.round)),
            "weights_sha256": final.manifest.weights_sha256,
        },
        mlflow={
            "tracking_uri": settings.tracking_uri,
            "experiment": config.federation,
            "experiment_id": tracker.experiment_id(),
            "run_id": tracker.mlflow_run_id,
        },
        prefect={"flow_run_id": str(runtime.flow_run.id)},
        timings={
            "flow_seconds": time.perf_counter() - started,
            "setup_seconds": setup_seconds,
            "round_median_seconds": statistics.median(round_times) if round_times else 0.0,
            "rounds_seconds": sum(round_times),
        },
        finished_at=datetime.now(UTC).isoformat(),
    )


def _publish_summary(
    ctx: RunContext,
    lineage: TrainingLineage,
    summaries: list[RoundSummary],
    history: list[dict[str, Any]],
    final_metrics: dict[str, float],
    participating: list[str],
    model: dict[str, str] | None,
) -> None:
    """The run's markdown summary and chart in the Prefect UI."""
    config = ctx.config
    ui = mlflow_ui_url(ctx.settings.tracking_uri)
    metric = config.evaluation.metric
    records = {s.round: s.model_dump(mode="json") for s in summaries}
    for row in history:  # rounds of an earlier attempt: their metrics, no site rows
        records.setdefault(int(row["round"]), {"round": row["round"], "metrics": row})
    publish_run_summary(
        RunOverview(
            federation=config.federation,
            tenant=config.tenant,
            run_id=ctx.run_id,
            config_revision=lineage.revision.revision,
            strategy=config.strategy.name,
            mode=config.mode,
            rounds=config.rounds,
            metric=metric,
            final_metrics=final_metrics,
            participating=participating,
            excluded=ctx.excluded,
            history=[
                (int(row["round"]), float(row[metric]))
                for row in history
                if isinstance(row.get(metric), int | float)
            ],
            bytes_up=sum(float(row.get("bytes_up", 0.0)) for row in history),
            bytes_down=sum(float(row.get("bytes_down", 0.0)) for row in history),
            model=f"{model['name']} version {model['version']}" if model else None,
            mlflow_url=model_url(ui, model["name"], model["version"]) if model else ui,
            round_median_seconds=(
                statistics.median(s.seconds for s in summaries) if summaries else 0.0
            ),
        ),
        [records[r] for r in sorted(records)],
    )


def _run_rounds(ctx: RunContext, first: int) -> list[RoundSummary]:
    """Rounds ``first`` … ``config.rounds``, with a progress bar and a Prefect progress artifact."""
    config = ctx.config
    summaries: list[RoundSummary] = []
    history = alerts.metric_history(ctx.settings.object_store, config, ctx.run_id, first)
    artifact: Any = create_progress_artifact(
        progress=100.0 * (first - 1) / config.rounds,
        description=f"{config.federation} run {ctx.run_id}: rounds completed",
    )
    with tqdm(
        total=config.rounds,
        initial=first - 1,
        desc=f"{config.federation} rounds",
        unit="round",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as progress:
        for summary in _rounds(ctx, first):
            summaries.append(summary)
            metric = config.evaluation.metric
            history.append(summary.metrics.get(metric, float("nan")))
            asked, contributed = _participation(config, summary)
            alerts.round_committed(
                config, ctx.run_id, summary.round, history[-1], asked, contributed, history
            )
            progress.set_postfix(
                {metric[:8]: f"{summary.metrics.get(metric, float('nan')):.3f}"},
                sites=f"{len(summary.accepted)}/{len(summary.selected)}",
                refresh=False,
            )
            progress.update()
            update_progress_artifact(artifact, progress=100.0 * summary.round / config.rounds)
    return summaries


def _participation(config: FederationConfig, summary: RoundSummary) -> tuple[int, int]:
    """(sites asked, sites that contributed) for the dropout alert. A synchronous round
    asks its selected sites; an async version counts the sites whose training ended while
    it filled (sites sent the version may still be training when it commits)."""
    accepted = len(summary.accepted)
    if config.mode != "async":
        return len(summary.selected), accepted
    return accepted + len(summary.rejected) + len(summary.failed) + len(summary.late), accepted


def _rounds(ctx: RunContext, first: int) -> Iterator[RoundSummary]:
    """Synchronous rounds, or (``mode: async``) FedBuff's global versions, as they commit."""
    if ctx.config.mode == "async":
        from fedround.flows.asynchronous import run_versions  # it builds on this module

        yield from run_versions(ctx, first)
        return
    pending_late: set[tuple[int, str]] = set()
    for round_ in range(first, ctx.config.rounds + 1):
        try:
            summary = run_round(ctx, round_, pending_late)
        except BudgetReached as exc:
            # Stop cleanly after the last round that fits; the run registers that model.
            get_run_logger().warning("stopping before round %d: %s", round_, exc)
            return
        yield summary
