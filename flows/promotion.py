"""The promotion flow: may the ``candidate`` model replace ``production``?

``promote_model`` (a Prefect flow; ``fedround promote <federation.yaml>``, or triggered
from the Prefect UI as a deployment) takes the federation's promotion lock, verifies the
artifacts of both models against their digests, and has every site evaluate both on its
own held-out data (federated evaluation: the weights, and a table model's preprocessor,
are published under the federation's readable prefix, each site's evaluation runs where
the site's work runs, only metrics come back; one ``site-evaluation`` task per site and
model). The gates of the config's ``promotion:`` section then decide on
``promotion.metric`` (default ``evaluation.metric``), in its direction
(:mod:`fedround.tasks.core.gates`):

- pass, no canary configured (or no production yet): the candidate becomes
  ``production``, the previous production ``deprecated``;
- pass, canary sites configured: the canary sites' aliases point at the candidate; a
  later ``fedround promote`` completes the rollout once ``min_soak_s`` has passed and, with
  ``recheck``, the canary sites evaluated it again and it still passes;
- fail: the version is tagged with the gate that failed and the figures; production stays.

Every outcome is appended to the audit log, an alias change as an ``intent`` entry before
it and the outcome after it. Two promotions of one model never interleave: the second
fails at once, naming the holder of the lock (or waits ``lock_wait_s``). Holding the lock,
a promotion first repairs any earlier promotion or rollback that died half-way
(:meth:`~fedround.tasks.lifecycle.Lifecycle.reconcile`); :func:`repair_promotions`
(``fedround promote --repair``) does only that.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from fedround.flows.dispatch import current_dispatcher, failure_reason, settle
from fedround.flows.federated_eval import evaluate_at_site
from fedround.site_workers.site_round import EvalSpec, SiteEvalResult
from fedround.tasks import alerts
from fedround.tasks.audit import AuditEntry, AuditLog
from fedround.tasks.config_versioning import config_revision
from fedround.tasks.core import keys
from fedround.tasks.core.config import FederationConfig, load_federation_config
from fedround.tasks.core.gates import GateDecision, SiteMetric, decide
from fedround.tasks.core.serialization import sha256_hex
from fedround.tasks.lifecycle import ROLLOUT, Lifecycle, LifecycleError
from fedround.tasks.locks import Lock, default_holder
from fedround.tasks.object_store import ObjectStore, open_store
from fedround.tasks.registry import (
    CANDIDATE,
    PRODUCTION,
    TAG,
    ModelRegistry,
    RegistryError,
    VerifiedModel,
)
from fedround.tasks.runtime import CoordinatorSettings

Outcome = Literal["promoted", "canary", "rejected"]


class PromotionResult(BaseModel):
    federation: str
    model: str
    version: str
    semver: str | None = None
    outcome: Outcome
    stage: str
    previous_production: str | None = None
    production: str | None = None
    canary_sites: list[str] = Field(default_factory=list)
    decision: dict[str, Any] | None = None
    audit_sequence: int | None = None
    # Audit entries written first by reconciling a half-done earlier promotion or rollback.
    repaired: list[int] = Field(default_factory=list)
    message: str


def promotion_lock(
    store: ObjectStore, config: FederationConfig, purpose: str, holder: str | None = None
) -> Lock:
    """The single-writer lock shared by promotions and rollbacks of one model."""
    return Lock(
        store,
        keys.lock_key(config.federation, f"promotion-{config.model_name}"),
        ttl_s=config.promotion.lock_ttl_s,
        holder=holder or default_holder(),
        purpose=purpose,
    )


@contextmanager
def site_dispatcher(config: FederationConfig, store: ObjectStore) -> Iterator[None]:
    """The dispatcher the caller set (embedded CLI), else the sites' own work pools."""
    if current_dispatcher.get(None) is not None:
        yield
        return
    from fedround.flows.distributed import DistributedDispatcher

    token = current_dispatcher.set(DistributedDispatcher(config, store))
    try:
        yield
    finally:
        current_dispatcher.reset(token)


# --- federated evaluation ---------------------------------------------------------------


def federated_evaluation(
    store: ObjectStore,
    config: FederationConfig,
    models: dict[str, VerifiedModel],
    sites: list[str],
) -> tuple[dict[str, dict[str, SiteMetric]], dict[str, str]]:
    """Each site evaluates each model on its own held-out data; metrics only come back.

    A table model's preprocessor is published beside its weights (under the federation's
    site-readable prefix) and announced with its digest, so every site transforms its rows
    exactly as the model was trained. The gates read ``config.promotion_metric`` from each
    site's metrics. Returns ``{label: {site: metric}}`` and the sites that could not
    evaluate, with why.
    """
    metric = config.promotion_metric
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    evaluation = f"promote-{stamp}-{secrets.token_hex(3)}"
    futures = {}
    for label, model in models.items():
        evaluation_id = f"{evaluation}-{label}"  # a site's result is keyed per evaluation id
        key = keys.evaluation_model_key(config.federation, evaluation_id, label)
        store.put(key, model.weights_bytes)
        preprocessing_key = preprocessing_sha256 = None
        if model.preprocessing_bytes is not None:
            preprocessing_key = keys.evaluation_preprocessing_key(
                config.federation, evaluation_id, label
            )
            store.put(preprocessing_key, model.preprocessing_bytes)
            preprocessing_sha256 = sha256_hex(model.preprocessing_bytes)
        for site in sites:
            spec = EvalSpec(
                federation=config.federation,
                site=site,
                model_key=key,
                model_sha256=model.weights_sha256,
                model=model.model_config,
                data=config.data,
                evaluation=config.evaluation,
                preprocessing_key=preprocessing_key,
                preprocessing_sha256=preprocessing_sha256,
            )
            futures[(label, site)] = evaluate_at_site.with_options(
                task_run_name=f"evaluate {label} v{model.version} · {site}"
            ).submit(spec, config.promotion.eval_timeout_s)
    metrics: dict[str, dict[str, SiteMetric]] = {label: {} for label in models}
    unavailable: dict[str, str] = {}
    for (label, site), result in settle(futures).items():
        if isinstance(result, SiteEvalResult) and result.ok:
            value = site_metric(result, metric)
            if value is not None:
                metrics[label][site] = SiteMetric(value, result.num_examples)
                continue
            why = f"its evaluation reported no {metric!r} (it reported {sorted(result.metrics)})"
        elif isinstance(result, SiteEvalResult):
            why = result.error or "site reported failure"
        else:
            why = failure_reason(result)
        unavailable[site] = f"{label}: {why}"
    for label in metrics:  # compare like with like: a site counts only if it did both
        for site in unavailable:
            metrics[label].pop(site, None)
    return metrics, unavailable


def site_metric(result: SiteEvalResult, metric: str) -> float | None:
    """The named metric from a site's evaluation (``loss``/``accuracy`` also from the
    fields sites reported before they sent every metric)."""
    value = result.metrics.get(metric)
    if value is None and metric in ("loss", "accuracy"):
        value = getattr(result, metric)
    return None if value is None else float(value)


def check_fits_data(config: FederationConfig, model: VerifiedModel, role: str) -> None:
    """A table federation evaluates table models (with a preprocessor); arrays, the others."""
    table = config.data.kind == "table"
    if table != (model.preprocessor is not None):
        has = "a preprocessor (a table model)" if model.preprocessor else "no preprocessor"
        raise LifecycleError(
            f"the {role} model {model.name} v{model.version} has {has}, but the federation's "
            f"data is {config.data.kind}: sites cannot evaluate it. Check registry.model_name "
            "in the config, or register a model trained on this data"
        )


# --- the flow ---------------------------------------------------------------------------


def _verified(registry: ModelRegistry, version: str, role: str) -> VerifiedModel:
    try:
        return registry.verify(version)
    except RegistryError as exc:
        raise RegistryError(f"the {role} model cannot be used: {exc}") from exc


def _report(result: PromotionResult, decision: GateDecision | None) -> None:
    lines = [f"## {result.model} v{result.version}: {result.outcome}", "", result.message, ""]
    if decision is not None:
        lines += [
            f"Metric: {decision.metric} ({decision.direction} is better)",
            "",
            "| site | candidate | production | change |",
            "|---|---|---|---|",
        ]
        for site, row in decision.sites.items():
            cells = [
                "–" if row[k] is None else f"{row[k]:.4f}"
                for k in ("candidate", "production", "change")
            ]
            lines.append(f"| {site} | " + " | ".join(cells) + " |")
        lines += [
            "",
            *[f"- {'✅' if g.passed else '❌'} {g.gate}: {g.detail}" for g in decision.gates],
        ]
    try:
        create_markdown_artifact(
            markdown="\n".join(lines),
            key=f"promotion-{result.model}".lower()[:100],
            description=f"promotion of {result.model} v{result.version}",
        )
    except Exception:  # the artifact is a convenience for the UI, never a failure
        get_run_logger().debug("could not create the promotion artifact", exc_info=True)


@flow(
    name="fedround-promotion",
    validate_parameters=False,
    task_runner=ThreadPoolTaskRunner(max_workers=32),  # type: ignore[arg-type]
)
def promote_model(
    config_path: str,
    version: str | None = None,
    allow_dirty: bool = False,
    lock_wait_s: float = 0.0,
) -> PromotionResult:
    """Evaluate ``version`` (default: the ``candidate`` alias) against ``production`` at
    every site and promote it if it passes the gates; see the module docstring."""
    logger = get_run_logger()
    config, revision, store, registry, audit = open_lifecycle(config_path, allow_dirty)
    purpose = f"promote {config.model_name} {version or '@' + CANDIDATE}"
    lock = promotion_lock(store, config, purpose).acquire(wait_s=lock_wait_s)
    try:
        lifecycle = Lifecycle(registry, audit, lock, revision)
        if lock.took_over is not None:
            audit.append(
                "lock-takeover",
                config.model_name,
                reason=f"took over an expired lock of {lock.took_over.get('holder')}",
                details={"expired_lock": lock.took_over},
                config_revision=revision,
            )
        repaired = [entry.sequence for entry in lifecycle.reconcile()]
        with site_dispatcher(config, store):
            result, decision = _promote(config, registry, lifecycle, store, version)
        result.repaired = repaired
    finally:
        lock.release()
    (logger.info if result.outcome != "rejected" else logger.warning)(result.message)
    if result.outcome == "rejected" and decision is not None:
        failed = [f"{gate.gate}: {gate.detail}" for gate in decision.gates if not gate.passed]
        alerts.promotion_gate_failed(config, result.model, result.version, failed)
    _report(result, decision)
    return result


def _promote(
    config: FederationConfig,
    registry: ModelRegistry,
    lifecycle: Lifecycle,
    store: ObjectStore,
    version: str | None,
) -> tuple[PromotionResult, GateDecision | None]:
    policy = config.promotion
    try:
        candidate_entry = registry.resolve(version or f"@{CANDIDATE}")
    except RegistryError as exc:
        raise LifecycleError(
            f"nothing to promote: {exc}. Train a model first (fedround run), or name a "
            "version with --version"
        ) from None
    number = str(candidate_entry.version)
    production_entry = registry.by_alias(PRODUCTION)
    production = str(production_entry.version) if production_entry else None
    if number == production:
        raise LifecycleError(f"{config.model_name} version {number} is already production")
    semver = candidate_entry.tags.get(f"{TAG}semver")
    base = {
        "federation": config.federation,
        "model": config.model_name,
        "version": number,
        "semver": semver,
        "previous_production": production,
    }
    completing = candidate_entry.tags.get(ROLLOUT) == "canary"
    stage = "complete-rollout" if completing else "evaluate"
    try:
        candidate = _verified(registry, number, "candidate")
    except RegistryError as exc:
        entry = lifecycle.reject(number, "integrity", str(exc), {}, production, stage)
        raise RegistryError(f"{exc} (rejection recorded, audit #{entry.sequence})") from exc
    models = {"candidate": candidate}
    if production is not None:
        models["production"] = _verified(registry, production, "production")
    for role, model in models.items():
        check_fits_data(config, model, role)

    if completing:
        started = datetime.fromisoformat(candidate_entry.tags[f"{TAG}canary_started_at"])
        soaked = (datetime.now(UTC) - started).total_seconds()
        if soaked < policy.rollout.min_soak_s:
            raise LifecycleError(
                f"the canary of {config.model_name} v{number} has run {soaked:.0f}s of the "
                f"{policy.rollout.min_soak_s:.0f}s required (promotion.rollout.min_soak_s); "
                "run fedround promote again later, or fedround rollback to stop it"
            )
        sites = [s for s in candidate_entry.tags.get(f"{TAG}canary_sites", "").split(",") if s]
    else:
        sites = [s.name for s in config.sites]

    decision: GateDecision | None = None
    if not completing or policy.rollout.recheck:
        metrics, unavailable = federated_evaluation(store, config, models, sites)
        min_sites = min(policy.min_sites or config.selection.min_sites, len(sites))
        decision = decide(
            metrics["candidate"],
            metrics.get("production") if production is not None else None,
            policy,
            min_sites,
            unavailable,
            metric=config.promotion_metric,
            direction=config.metric_direction(),
        )
        figures = decision.to_dict()
        if not decision.passed:
            gate = decision.failed[0]
            reason = f"{'canary check ' if completing else ''}{decision.summary()}"
            entry = lifecycle.reject(number, gate, reason, figures, production, stage)
            message = (
                f"{config.model_name} v{number} rejected ({gate}): {decision.summary()}; "
                f"production stays {'v' + production if production else 'unset'}"
            )
            return (
                PromotionResult(
                    **base,
                    outcome="rejected",
                    stage=stage,
                    production=production,
                    decision=figures,
                    audit_sequence=entry.sequence,
                    message=message,
                ),
                decision,
            )
    else:
        figures = {"recheck": "skipped (promotion.rollout.recheck is false)"}

    canary = policy.rollout.canary
    if not completing and canary and production is not None:
        entry = lifecycle.start_canary(number, canary, figures, production)
        message = (
            f"{config.model_name} v{number} passed the gates and is live at the canary sites "
            f"{', '.join(canary)} (alias production-<site>); everyone else stays on "
            f"v{production}. Complete the rollout with `fedround promote` "
            f"(after {policy.rollout.min_soak_s:.0f}s), or stop it with `fedround rollback`."
        )
        return (
            PromotionResult(
                **base,
                outcome="canary",
                stage="canary",
                production=production,
                canary_sites=canary,
                decision=figures,
                audit_sequence=entry.sequence,
                message=message,
            ),
            decision,
        )
    if production is None:
        reason = (
            "first production model: no earlier production to compare with, only the quorum "
            "and floor gates apply"
            + ("; no canary stage, nobody serves a model yet" if canary else "")
        )
    elif completing:
        reason = f"canary at {', '.join(sites)} completed; rollout to every site"
    else:
        reason = decision.summary() if decision else "gates passed"
    entry = lifecycle.make_production(number, production, reason, figures, stage)
    message = f"{config.model_name} v{number} ({semver}) is now production: {reason}" + (
        f"; v{production} is deprecated" if production else ""
    )
    return (
        PromotionResult(
            **base,
            outcome="promoted",
            stage="complete-rollout" if completing else "full",
            production=number,
            decision=figures,
            audit_sequence=entry.sequence,
            message=message,
        ),
        decision,
    )


def open_lifecycle(
    config_path: str, allow_dirty: bool
) -> tuple[FederationConfig, str, ObjectStore, ModelRegistry, AuditLog]:
    """What a promotion, rollback or repair acts on: the federation's config, its revision
    (refused when dirty unless ``allow_dirty``), the object store, the model's registry
    entry and the federation's audit log."""
    path = Path(config_path)
    config = load_federation_config(path)
    revision = config_revision(path, path.parent / config.contract, allow_dirty)
    settings = CoordinatorSettings.from_env()
    store = open_store(settings.object_store)
    registry = ModelRegistry(settings.tracking_uri, config.model_name)
    return config, revision.revision, store, registry, AuditLog(store, config.federation)


def repair_promotions(config_path: str, lock_wait_s: float = 0.0) -> list[AuditEntry]:
    """Finish or abandon every promotion or rollback of the federation's model that died
    half-way (an ``intent`` in the audit log without its outcome), from the registry's
    actual aliases; returns the audit entries written (none if nothing was half-done)."""
    config, revision, store, registry, audit = open_lifecycle(config_path, allow_dirty=True)
    lock = promotion_lock(store, config, f"repair {config.model_name}").acquire(lock_wait_s)
    try:
        return Lifecycle(registry, audit, lock, revision).reconcile()
    finally:
        lock.release()


def result_json(result: PromotionResult) -> str:
    return json.dumps(result.model_dump(mode="json"))
