"""Alerts, decided: which events a run emits, when a round's dropout or a metric's plateau
deserves an alert, and which Prefect automations a federation's ``alerts:`` section yields.

Pure: no Prefect here. :mod:`fedround.tasks.alerts` emits the events and creates the
automations from the specs below; Prefect's own services (its event triggers and actions)
evaluate them and send the notifications, so fedround runs no scheduler of its own.

Automations (one per condition, named ``fedround <federation>: <condition>``):

- reactive, one alert per event: ``fedround.round.dropout``, ``fedround.run.plateau``,
  ``fedround.run.failed``, ``fedround.promotion.gate-failed`` of this federation;
- proactive (``stall``): after ``fedround.run.started`` or ``fedround.round.committed`` of a
  run, Prefect expects ``fedround.round.committed`` (or the run's end:
  ``fedround.run.finished`` / ``fedround.run.failed``) within ``stall_after_s``, for each
  run separately; if none comes, it alerts once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import FederationConfig

RUN_STARTED = "fedround.run.started"
ROUND_COMMITTED = "fedround.round.committed"
ROUND_DROPOUT = "fedround.round.dropout"
RUN_PLATEAU = "fedround.run.plateau"
RUN_FAILED = "fedround.run.failed"
RUN_FINISHED = "fedround.run.finished"
GATE_FAILED = "fedround.promotion.gate-failed"

TENANT_LABEL = "fedround.tenant"
FEDERATION_LABEL = "fedround.federation"


def run_resource(config: FederationConfig, run_id: str) -> dict[str, str]:
    """The Prefect event resource of one training run."""
    return {
        "prefect.resource.id": f"fedround.run.{config.federation}.{run_id}",
        "prefect.resource.name": f"{config.federation} run {run_id}",
        TENANT_LABEL: config.tenant,
        FEDERATION_LABEL: config.federation,
        "fedround.run_id": run_id,
    }


def model_resource(config: FederationConfig, model: str, version: str) -> dict[str, str]:
    """The Prefect event resource of one registered model version."""
    return {
        "prefect.resource.id": f"fedround.model.{model}.{version}",
        "prefect.resource.name": f"{model} v{version}",
        TENANT_LABEL: config.tenant,
        FEDERATION_LABEL: config.federation,
        "fedround.model": model,
        "fedround.version": version,
    }


# --- the decisions ----------------------------------------------------------------------


def dropout(selected: int, accepted: int, share: float) -> str | None:
    """The alert when more than ``share`` of a round's ``selected`` sites did not
    contribute (``accepted`` of them did), else ``None``.

    >>> dropout(4, 1, 0.5)
    '3 of 4 selected sites did not contribute (75% > 50%)'
    """
    if selected <= 0:
        return None
    missing = max(selected - accepted, 0)
    if missing / selected <= share:
        return None
    return (
        f"{missing} of {selected} selected sites did not contribute "
        f"({missing / selected:.0%} > {share:.0%})"
    )


def plateau(history: list[float], patience: int, higher_is_better: bool) -> str | None:
    """The alert when the last improvement of the metric (``history``: its value after
    each round, oldest first) is exactly ``patience`` rounds old, else ``None``.

    Exactly: a plateau is reported once, the round it becomes ``patience`` rounds long,
    not again every round it goes on; a new best value starts the count again. The first
    value counts as an improvement; values that are not finite never do.
    """
    best: float | None = None
    best_at = -1
    for at, value in enumerate(history):
        if not math.isfinite(value):
            continue
        if best is None or (value > best if higher_is_better else value < best):
            best, best_at = value, at
    if best is None or len(history) - 1 - best_at != patience:
        return None
    direction = "higher" if higher_is_better else "lower"
    return (
        f"no improvement for {patience} rounds: best {best:.6g} ({direction} is better) "
        f"was {patience} rounds ago, latest {history[-1]:.6g}"
    )


# --- the automations --------------------------------------------------------------------

AUTOMATION_PREFIX = "fedround {federation}: "
# Every condition an automation may watch: its name is the prefix plus the condition.
CONDITIONS = ("dropout", "plateau", "failed", "gate-failed", "stall")


@dataclass(frozen=True)
class AutomationSpec:
    """One automation as data: ``trigger`` is a Prefect ``EventTrigger`` in its JSON form,
    ``subject`` and ``body`` are the notification's Jinja templates (Prefect renders them
    with the triggering ``event``)."""

    name: str
    condition: str
    description: str
    trigger: dict[str, Any]
    subject: str
    body: str


def automation_prefix(config: FederationConfig) -> str:
    """Every automation of this federation is named with this prefix (and only those)."""
    return AUTOMATION_PREFIX.format(federation=config.federation)


def automation_specs(config: FederationConfig) -> list[AutomationSpec]:
    """The automations ``config.alerts`` asks for; none when alerts are off or have no
    channel to send to."""
    alerts = config.alerts
    if not alerts.enabled or not alerts.channels:
        return []
    match = {FEDERATION_LABEL: config.federation, TENANT_LABEL: config.tenant}
    prefix = automation_prefix(config)
    where = "{{ event.resource.id }}"
    message = "{{ event.payload.message }}"
    reactive = {
        "dropout": (
            ROUND_DROPOUT,
            "too many selected sites dropped out of a round",
            f"round {{{{ event.payload.round }}}} of {where}: {message}",
        ),
        "plateau": (
            RUN_PLATEAU,
            f"{config.evaluation.metric} has not improved for {alerts.patience_rounds} rounds",
            f"after round {{{{ event.payload.round }}}} of {where}: {message}",
        ),
        "failed": (RUN_FAILED, "a training run failed", f"{where} failed: {message}"),
        "gate-failed": (
            GATE_FAILED,
            "a candidate model failed a promotion gate",
            f"{where} was not promoted: {message}",
        ),
    }
    specs = [
        AutomationSpec(
            name=prefix + condition,
            condition=condition,
            description=f"{what} ({config.federation}, tenant {config.tenant})",
            trigger={
                "type": "event",
                "posture": "Reactive",
                "match": match,
                "expect": [event],
                "threshold": 1,
                "within": 0,
            },
            subject=f"[fedround] {config.federation}: {condition}",
            body=body,
        )
        for condition, (event, what, body) in reactive.items()
    ]
    specs.append(
        AutomationSpec(
            name=prefix + "stall",
            condition="stall",
            description=(
                f"no round of a run committed within {alerts.stall_after_s:g} s "
                f"({config.federation}, tenant {config.tenant})"
            ),
            trigger={
                "type": "event",
                "posture": "Proactive",
                "match": match,
                "after": [RUN_STARTED, ROUND_COMMITTED],
                "expect": [ROUND_COMMITTED, RUN_FINISHED, RUN_FAILED],
                "for_each": ["prefect.resource.id"],
                "threshold": 1,
                "within": alerts.stall_after_s,
            },
            subject=f"[fedround] {config.federation}: stall",
            body=(
                f"{where} stalled: no round committed within {alerts.stall_after_s:g} s "
                "after {{ event.event }} at {{ event.occurred }}"
            ),
        )
    )
    return specs
