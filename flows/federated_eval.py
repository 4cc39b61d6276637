"""Federated evaluation and the label-skew report, beside the training flow.

Every round's model is scored at the sites, one round behind and at no extra dispatch:
the sites of round r that :func:`evaluating_sites` picks evaluate the model they receive
(round r − 1's) on their own test file before they train, and send the figures with
their update (:func:`fedround.site_workers.site_round.evaluate_received`). The coordinator
logs them to MLflow at step r − 1: ``federated_<metric>`` (example-weighted over the
sites) and ``site.<site>.eval_<metric>``. The last round's model has no next round: after
the run, :func:`evaluate_final_model` has the sites evaluate it through the dispatcher's
``evaluate`` (as ``fedround promote`` does), logged at the last round's step.

The label-skew report (:mod:`fedround.tasks.core.skew`) is computed from the label counts
the sites send with their data contracts, and kept in the run's lineage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedround.flows.dispatch import current_dispatcher, failure_reason, settle
from fedround.site_workers.site_round import EvalSpec, SiteEvalResult
from fedround.tasks.core import keys
from fedround.tasks.core.config import FederationConfig, ModelConfig
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.federated_eval import (
    eval_report,
    federated_metrics,
    per_site_metrics,
    sample_evaluators,
    site_eval,
)
from fedround.tasks.core.serialization import Weights, sha256_hex, weights_to_bytes
from fedround.tasks.core.skew import label_skew_report
from fedround.tasks.object_store import ObjectStore
from fedround.tasks.retry import only_transient
from fedround.tasks.tracking import RunTracker

if TYPE_CHECKING:
    from fedround.flows.training import RunContext

log = logging.getLogger(__name__)

LABEL_SKEW_ARTIFACT = "lineage/label_skew.json"


@task(
    name="site-evaluation",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=only_transient,
)
def evaluate_at_site(spec: EvalSpec, timeout: float) -> SiteEvalResult:
    """One site evaluates one published model (the final model of a run, or a promotion's
    candidate and production); only metrics come back."""
    return current_dispatcher.get().evaluate(spec, timeout)


def log_evaluation(
    tracker: RunTracker,
    model_round: int,
    reports: Mapping[str, Mapping[str, float]],
    caps: Mapping[str, int],
) -> dict[str, float]:
    """The sites' figures for the model of ``model_round``, logged at that step:
    ``federated_<metric>`` and ``site.<site>.eval_<metric>``. Returns the federated ones
    (empty when no site evaluated)."""
    federated = federated_metrics(reports, caps)
    if federated:
        tracker.log_metrics(
            {**federated, **per_site_metrics(reports)}, step=model_round, wait=False
        )
    return federated


def evaluate_final_model(
    store: ObjectStore,
    config: FederationConfig,
    run_id: str,
    model_round: int,
    weights: Weights,
    model: ModelConfig,
    sites: list[str],
    preprocessing_sha256: str | None,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """The final model evaluated at (a ``fraction`` of) the run's sites, on their test files.

    Returns each site's report (``eval_<metric>``, ``eval_examples``) and the sites that
    did not evaluate, with why (no test file, unavailable, failed).
    """
    chosen = sample_evaluators(
        sites, config.evaluation.federated.fraction, config.seed, model_round + 1
    )
    if not chosen:
        return {}, {}
    evaluation_id = f"{run_id}-round-{model_round:04d}"
    key = keys.evaluation_model_key(config.federation, evaluation_id, "final")
    payload = weights_to_bytes(weights)
    store.put(key, payload)
    table = preprocessing_sha256 is not None
    futures = {
        site: evaluate_at_site.with_options(task_run_name=f"evaluate final model · {site}").submit(
            EvalSpec(
                federation=config.federation,
                site=site,
                model_key=key,
                model_sha256=sha256_hex(payload),
                model=model,
                data=config.data,
                evaluation=config.evaluation,
                preprocessing_key=keys.preprocessing_key(config.federation, run_id)
                if table
                else None,
                preprocessing_sha256=preprocessing_sha256,
            ),
            config.promotion.eval_timeout_s,
        )
        for site in chosen
    }
    reports: dict[str, dict[str, float]] = {}
    missing: dict[str, str] = {}
    for site, result in settle(futures).items():
        if isinstance(result, SiteEvalResult) and result.ok:
            reports[site] = eval_report(result.metrics, result.num_examples)
        elif isinstance(result, SiteEvalResult):
            missing[site] = result.error or "site reported failure"
        else:
            missing[site] = failure_reason(result)
    return reports, missing


@dataclass(frozen=True)
class FinalEvaluation:
    """The final model at the sites: federated figures, each site's, and who did not."""

    federated: dict[str, float] = field(default_factory=dict)
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """For the run summary (result.json ``sites.final_evaluation``)."""
        return {
            "federated": self.federated,
            "sites": {site: per_site(report) for site, report in self.sites.items()},
            "not_evaluated": self.missing,
        }


def per_site(report: Mapping[str, float]) -> dict[str, float]:
    values, examples = site_eval(report)
    return {**values, "examples": examples}


def evaluate_final(
    tracker: RunTracker, store: ObjectStore, ctx: RunContext, weights: Weights
) -> FinalEvaluation:
    """After the last round: the final model evaluated at the sites and logged at the last
    round's step (``evaluation.federated.final``). Best effort: a failure is logged and
    leaves the run as it is."""
    config = ctx.config
    if not config.evaluation.federated.final:
        return FinalEvaluation()
    try:
        reports, missing = evaluate_final_model(
            store,
            config,
            ctx.run_id,
            config.rounds,
            weights,
            ctx.model,
            ctx.eligible,
            ctx.preprocessing_sha256,
        )
        for site, why in sorted(missing.items()):
            log.info("site %s did not evaluate the final model: %s", site, why)
        federated = log_evaluation(tracker, config.rounds, reports, ctx.max_examples)
    except Exception:
        log.warning("federated evaluation of the final model failed", exc_info=True)
        return FinalEvaluation()
    return FinalEvaluation(federated, reports, missing)


def record_label_skew(tracker: RunTracker, passed: Mapping[str, ContractReport]) -> dict[str, Any]:
    """The label-skew report of the sites that passed their contracts: logged as
    ``lineage/label_skew.json``, per-site metrics at step 0 (``site.<site>.label_chi2``,
    ``site.<site>.label_tv_distance``) and a tag naming the most skewed site. Best effort:
    a failure to record is logged, never fails the run."""
    report = label_skew_report(passed)
    if not report:
        return {}
    try:
        tracker.log_text(json.dumps(report, indent=2, sort_keys=True), LABEL_SKEW_ARTIFACT)
        sites: dict[str, dict[str, Any]] = report["sites"]
        metrics = {
            f"site.{site}.label_{figure}": float(entry[figure])
            for site, entry in sites.items()
            for figure in ("chi2", "tv_distance")
        }
        metrics["label_skew_max_tv_distance"] = float(report["max_tv_distance"])
        tracker.log_metrics(metrics, step=0, wait=False)
        most = max(sorted(sites), key=lambda site: sites[site]["tv_distance"])
        tracker.set_tags(
            {
                "fedround.label_skew_max_tv_distance": f"{report['max_tv_distance']:.4f}",
                "fedround.label_skew_most_skewed_site": most,
            }
        )
    except Exception:
        log.warning("could not record the label-skew report", exc_info=True)
    return report
