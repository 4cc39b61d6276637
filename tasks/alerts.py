"""Alerts through Prefect's own events and automations: fedround runs no scheduler.

Runs emit events (:func:`run_started`, :func:`round_committed`, :func:`run_finished`,
:func:`promotion_gate_failed`); ``fedround deploy`` creates, per federation, notification
blocks and automations (:func:`ensure_automations`) that Prefect's triggers and actions
services evaluate on the server. What each event means and which automations a config
yields is decided in :mod:`fedround.tasks.core.alerts`.

Events, each on the run's resource ``fedround.run.<federation>.<run_id>`` (labels
``fedround.tenant``, ``fedround.federation``, ``fedround.run_id``) or, for promotions, the
model's ``fedround.model.<model>.<version>``; every payload has a ``message``:

=================================  ===========================================================
``fedround.run.started``           ``run_id``, ``rounds``, ``mode``
``fedround.round.committed``       ``round``, ``metric``, ``value``, ``sites_selected``,
                                   ``sites_accepted``
``fedround.round.dropout``         ``round``, ``sites_selected``, ``sites_accepted``,
                                   ``dropout_share``
``fedround.run.plateau``           ``round``, ``metric``, ``value``, ``patience_rounds``
``fedround.run.failed``            ``reason``
``fedround.run.finished``          ``ok``, ``reason`` (after every run, failed ones too)
``fedround.promotion.gate-failed`` ``model``, ``version``, ``reasons``
=================================  ===========================================================

Emitting never fails or slows a run: Prefect queues the event and sends it from a
background thread; anything that goes wrong is logged here and otherwise ignored.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from fedround.tasks.checkpoints import committed_rounds, read_manifest
from fedround.tasks.core import alerts as decide
from fedround.tasks.core.config import FederationConfig
from fedround.tasks.core.errors import ConfigError, FedroundError
from fedround.tasks.object_store import ObjectStoreSettings, open_store

if TYPE_CHECKING:
    from prefect.blocks.core import Block

log = logging.getLogger(__name__)

# Prefect's Sendgrid block needs an API key; it is read where `fedround deploy` runs and
# kept in the block document on the Prefect server, never in the federation config.
SENDGRID_KEY_ENV = "FEDROUND_SENDGRID_API_KEY"
MAX_REASON = 2000  # characters of a failure's reason an event carries


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _emit(event: str, resource: dict[str, str], payload: dict[str, Any]) -> None:
    try:
        from prefect.events import emit_event

        emit_event(event=event, resource=resource, payload=payload)
    except Exception:  # an alert is never worth a failed round
        log.warning("could not emit the Prefect event %s", event, exc_info=True)


# --- events from the flows --------------------------------------------------------------


def run_started(config: FederationConfig, run_id: str) -> None:
    """``fedround.run.started``: from now on, the stall alert expects a committed round."""
    _emit(
        decide.RUN_STARTED,
        decide.run_resource(config, run_id),
        {
            "run_id": run_id,
            "rounds": config.rounds,
            "mode": config.mode,
            "message": f"run {run_id} of {config.federation} started ({config.rounds} rounds)",
        },
    )


def round_committed(
    config: FederationConfig,
    run_id: str,
    round_: int,
    metric_value: float | None,
    selected: int,
    accepted: int,
    metric_history: list[float],
) -> None:
    """``fedround.round.committed``, and ``fedround.round.dropout`` / ``fedround.run.plateau``
    when the checks of :mod:`fedround.tasks.core.alerts` say so (``alerts.enabled``).

    ``metric_history``: ``evaluation.metric`` after each round of the run so far, this one
    included (``nan`` for a round without it).
    """
    resource = decide.run_resource(config, run_id)
    metric = config.evaluation.metric
    value = _finite(metric_value)
    _emit(
        decide.ROUND_COMMITTED,
        resource,
        {
            "round": round_,
            "metric": metric,
            "value": value,
            "sites_selected": selected,
            "sites_accepted": accepted,
            "message": f"round {round_}: {accepted}/{selected} sites, {metric} {value}",
        },
    )
    alerts = config.alerts
    if not alerts.enabled:
        return
    try:
        dropped = decide.dropout(selected, accepted, alerts.dropout_share)
        higher = config.evaluation.direction(metric) == "higher"
        stalled = decide.plateau(metric_history, alerts.patience_rounds, higher)
    except Exception:
        log.warning("alert checks failed after round %d", round_, exc_info=True)
        return
    if dropped is not None:
        _emit(
            decide.ROUND_DROPOUT,
            resource,
            {
                "round": round_,
                "sites_selected": selected,
                "sites_accepted": accepted,
                "dropout_share": alerts.dropout_share,
                "message": dropped,
            },
        )
    if stalled is not None:
        _emit(
            decide.RUN_PLATEAU,
            resource,
            {
                "round": round_,
                "metric": metric,
                "value": value,
                "patience_rounds": alerts.patience_rounds,
                "message": f"{metric}: {stalled}",
            },
        )


def run_finished(config: FederationConfig, run_id: str, ok: bool, reason: str | None) -> None:
    """``fedround.run.failed`` (when not ``ok``), then ``fedround.run.finished``, which ends
    the run's stall watch."""
    resource = decide.run_resource(config, run_id)
    reason = None if reason is None else reason[:MAX_REASON]
    if not ok:
        _emit(
            decide.RUN_FAILED,
            resource,
            {"reason": reason, "message": reason or "the run failed"},
        )
    _emit(
        decide.RUN_FINISHED,
        resource,
        {
            "ok": ok,
            "reason": reason,
            "message": f"run {run_id} " + ("finished" if ok else f"failed: {reason}"),
        },
    )


def promotion_gate_failed(
    config: FederationConfig, model: str, version: str, reasons: list[str]
) -> None:
    """``fedround.promotion.gate-failed``: ``reasons`` are the failed gates, with figures."""
    _emit(
        decide.GATE_FAILED,
        decide.model_resource(config, model, version),
        {
            "model": model,
            "version": version,
            "reasons": reasons,
            "message": "; ".join(reasons) or "a promotion gate failed",
        },
    )


def metric_history(
    store_settings: ObjectStoreSettings, config: FederationConfig, run_id: str, before: int
) -> list[float]:
    """``evaluation.metric`` after each committed round ``1 … before − 1`` (a resumed run's
    earlier rounds, from their checkpoint manifests; ``nan`` where a round has none).
    Empty when alerts are off, or when the manifests cannot be read (logged)."""
    if before <= 1 or not config.alerts.enabled:
        return []
    metric = config.evaluation.metric
    try:
        store = open_store(store_settings)
        rounds = [r for r in committed_rounds(store, config.federation, run_id) if 0 < r < before]
        return [
            read_manifest(store, config.federation, run_id, r).metrics.get(metric, math.nan)
            for r in rounds
        ]
    except Exception:
        log.warning("could not read the metric history of run %s", run_id, exc_info=True)
        return []


# --- automations, created by `fedround deploy` -------------------------------------------


def check_alerts(config: FederationConfig, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, before anything is created, alerts that could not be delivered."""
    environ = os.environ if environ is None else environ
    alerts = config.alerts
    if alerts.enabled and alerts.email and not environ.get(SENDGRID_KEY_ENV):
        raise ConfigError(
            f"alerts.email: sending email needs a {alerts.email_via} API key in "
            f"{SENDGRID_KEY_ENV} where `fedround deploy` runs (it is kept in a Prefect "
            "block, not in the config); set it, or remove alerts.email"
        )


def notification_blocks(
    config: FederationConfig, environ: Mapping[str, str] | None = None
) -> dict[str, Block]:
    """The notification blocks of ``config``'s channels, by block document name."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SendgridEmail

    check_alerts(config, environ)
    environ = os.environ if environ is None else environ
    alerts, federation = config.alerts, config.federation
    blocks: dict[str, Block] = {}
    if alerts.webhook is not None:
        blocks[f"fedround-{federation}-webhook"] = CustomWebhookNotificationBlock(
            name=f"fedround {federation} alerts",
            url=alerts.webhook,
            json_data={
                "subject": "{{subject}}",
                "body": "{{body}}",
                "federation": federation,
                "tenant": config.tenant,
            },
        )
    if alerts.email:
        assert alerts.email_sender is not None  # the config refuses email without a sender
        blocks[f"fedround-{federation}-email"] = SendgridEmail(
            api_key=environ[SENDGRID_KEY_ENV],
            sender_email=alerts.email_sender,
            to_emails=list(alerts.email),
        )
    return blocks


def ensure_automations(config: FederationConfig) -> list[str]:
    """Create (or replace) the federation's notification blocks and automations on the
    Prefect server of ``PREFECT_API_URL``; returns the names of the automations now in
    place. Automations of this federation that the config no longer asks for are deleted
    (all of them when ``alerts.enabled`` is false or no channel is set)."""
    try:
        return _ensure_automations(config)
    except FedroundError:
        raise
    except Exception as exc:
        raise FedroundError(
            f"creating the alert automations of {config.federation} on the Prefect server "
            f"failed: {exc}"
        ) from exc


def _ensure_automations(config: FederationConfig) -> list[str]:
    from prefect.automations import AutomationCore, EventTrigger, SendNotification
    from prefect.client.orchestration import get_client
    from prefect.events.filters import AutomationFilter, AutomationFilterName

    specs = decide.automation_specs(config)
    blocks = notification_blocks(config) if specs else {}
    block_ids = [
        cast(UUID, block.save(name, overwrite=True, _sync=True))  # type: ignore[call-arg]
        for name, block in blocks.items()
    ]
    ours = [decide.automation_prefix(config) + c for c in decide.CONDITIONS]
    with get_client(sync_client=True) as client:
        existing = client.read_automations(
            automations=AutomationFilter(name=AutomationFilterName(any_=ours))
        )
        created = []
        for spec in specs:
            automation = AutomationCore(
                name=spec.name,
                description=spec.description,
                tags=[f"federation:{config.federation}", f"tenant:{config.tenant}"],
                trigger=EventTrigger.model_validate(spec.trigger),
                actions=[
                    SendNotification(block_document_id=block, subject=spec.subject, body=spec.body)
                    for block in block_ids
                ],
            )
            client.create_automation(automation)
            created.append(spec.name)
        for old in existing:  # after the new ones exist: no moment without alerts
            if old.id is not None:
                client.delete_automation(old.id)
    log.info(
        "alerts of %s: %s",
        config.federation,
        ", ".join(created) or "none (alerts disabled or no channel)",
    )
    return created
