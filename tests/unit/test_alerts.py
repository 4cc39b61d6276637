"""Alerts: the pure decisions (dropout, plateau, which automations), and the thin Prefect side
with ``emit_event`` replaced (no server): what is emitted, and that nothing ever raises."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from fedround.tasks import alerts
from fedround.tasks.checkpoints import save_checkpoint
from fedround.tasks.core import alerts as decide
from fedround.tasks.core.config import FederationConfig, parse_federation_config
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.object_store import ObjectStoreSettings, open_store

MINIMAL = "federation: fed\ntenant: acme\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"


def config_with(extra: str = "") -> FederationConfig:
    return parse_federation_config(MINIMAL + extra)


# --- dropout -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selected", "accepted", "share", "expected"),
    [
        (4, 1, 0.5, "3 of 4 selected sites did not contribute (75% > 50%)"),
        (4, 2, 0.5, None),  # exactly the share: not above it
        (4, 4, 0.5, None),
        (10, 6, 0.3, "4 of 10 selected sites did not contribute (40% > 30%)"),
        (3, 0, 1.0, None),  # share 1: never
        (3, 0, 0.99, "3 of 3 selected sites did not contribute (100% > 99%)"),
        (0, 0, 0.5, None),  # nobody asked
        (2, 3, 0.1, None),  # more contributions than asked (async): no dropout
    ],
)
def test_dropout(selected: int, accepted: int, share: float, expected: str | None) -> None:
    assert decide.dropout(selected, accepted, share) == expected


# --- plateau -----------------------------------------------------------------------------


def test_plateau_fires_once_when_the_best_is_exactly_patience_rounds_old() -> None:
    history = [0.5, 0.7, 0.69, 0.7, 0.65]
    # best 0.7 at round 2 (a tie later is no improvement)
    assert decide.plateau(history[:4], 3, higher_is_better=True) is None
    assert decide.plateau(history, 3, higher_is_better=True) == (
        "no improvement for 3 rounds: best 0.7 (higher is better) was 3 rounds ago, latest 0.65"
    )
    assert decide.plateau([*history, 0.6], 3, higher_is_better=True) is None  # said once


def test_plateau_restarts_after_a_new_best() -> None:
    history = [0.5, 0.4, 0.4, 0.9, 0.8, 0.8]
    assert decide.plateau(history[:3], 2, higher_is_better=True) == (
        "no improvement for 2 rounds: best 0.5 (higher is better) was 2 rounds ago, latest 0.4"
    )
    assert decide.plateau(history[:5], 2, higher_is_better=True) is None
    assert decide.plateau(history, 2, higher_is_better=True) == (
        "no improvement for 2 rounds: best 0.9 (higher is better) was 2 rounds ago, latest 0.8"
    )


def test_plateau_lower_is_better() -> None:
    assert decide.plateau([2.0, 1.0, 1.5, 1.2], 2, higher_is_better=False) == (
        "no improvement for 2 rounds: best 1 (lower is better) was 2 rounds ago, latest 1.2"
    )
    assert decide.plateau([2.0, 1.0, 1.5, 0.9], 2, higher_is_better=False) is None


def test_plateau_needs_history_and_ignores_values_that_are_not_finite() -> None:
    assert decide.plateau([], 1, higher_is_better=True) is None
    assert decide.plateau([math.nan, math.nan], 1, higher_is_better=True) is None
    # nan rounds count as rounds without improvement, never as a best
    assert decide.plateau([0.3, math.nan, math.inf], 2, higher_is_better=True) == (
        "no improvement for 2 rounds: best 0.3 (higher is better) was 2 rounds ago, latest inf"
    )
    assert decide.plateau([0.1, 0.2], 1, higher_is_better=True) is None  # still improving


# --- resources and automations ---------------------------------------------------------


def test_run_and_model_resources() -> None:
    config = config_with()
    assert decide.run_resource(config, "r1") == {
        "prefect.resource.id": "fedround.run.fed.r1",
        "prefect.resource.name": "fed run r1",
        "fedround.tenant": "acme",
        "fedround.federation": "fed",
        "fedround.run_id": "r1",
    }
    assert decide.model_resource(config, "fed-global", "3")["prefect.resource.id"] == (
        "fedround.model.fed-global.3"
    )


def test_no_automations_without_a_channel_or_when_disabled() -> None:
    assert decide.automation_specs(config_with()) == []
    off = config_with("alerts: {enabled: false, webhook: 'https://x.org/h'}\n")
    assert decide.automation_specs(off) == []


def test_automations_of_a_config() -> None:
    config = config_with(
        "selection: {deadline_s: 30}\n"
        "alerts: {webhook: 'https://x.org/h', stall_after_s: 60, patience_rounds: 4}\n"
    )
    specs = {spec.condition: spec for spec in decide.automation_specs(config)}
    assert list(specs) == list(decide.CONDITIONS)
    assert {spec.name for spec in specs.values()} == {
        f"fedround fed: {c}" for c in decide.CONDITIONS
    }
    match = {"fedround.federation": "fed", "fedround.tenant": "acme"}
    assert specs["dropout"].trigger == {
        "type": "event",
        "posture": "Reactive",
        "match": match,
        "expect": ["fedround.round.dropout"],
        "threshold": 1,
        "within": 0,
    }
    for condition, event in [
        ("plateau", "fedround.run.plateau"),
        ("failed", "fedround.run.failed"),
        ("gate-failed", "fedround.promotion.gate-failed"),
    ]:
        assert specs[condition].trigger["expect"] == [event]
        assert specs[condition].trigger["posture"] == "Reactive"
    assert specs["stall"].trigger == {
        "type": "event",
        "posture": "Proactive",
        "match": match,
        "after": ["fedround.run.started", "fedround.round.committed"],
        "expect": ["fedround.round.committed", "fedround.run.finished", "fedround.run.failed"],
        "for_each": ["prefect.resource.id"],
        "threshold": 1,
        "within": 60.0,
    }
    assert specs["plateau"].description.startswith("accuracy has not improved for 4 rounds")
    assert specs["dropout"].subject == "[fedround] fed: dropout"
    assert specs["dropout"].body == (
        "round {{ event.payload.round }} of {{ event.resource.id }}: {{ event.payload.message }}"
    )
    assert "stalled: no round committed within 60 s" in specs["stall"].body


def test_specs_are_valid_prefect_triggers() -> None:
    from prefect.automations import EventTrigger, Posture, SendNotification

    config = config_with("alerts: {webhook: 'https://x.org/h'}\n")
    for spec in decide.automation_specs(config):
        trigger = EventTrigger.model_validate(spec.trigger)
        assert trigger.match.model_dump() == {
            "fedround.federation": "fed",
            "fedround.tenant": "acme",
        }
        if spec.condition == "stall":
            assert trigger.posture == Posture.Proactive
            assert trigger.within == timedelta(seconds=1800)
            assert trigger.for_each == {"prefect.resource.id"}
        else:
            assert trigger.posture == Posture.Reactive and trigger.within == timedelta(0)
        # Prefect checks the templates are valid Jinja when the action is built.
        SendNotification.model_validate(
            {"block_document_id": "00000000-0000-0000-0000-000000000000", **spec.__dict__}
        )


# --- the Prefect side, with emit_event replaced ------------------------------------------


@pytest.fixture
def emitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import prefect.events

    events: list[dict[str, Any]] = []

    def fake(**kwargs: Any) -> None:
        events.append(kwargs)

    monkeypatch.setattr(prefect.events, "emit_event", fake)
    return events


def test_round_committed_emits_dropout_and_plateau(emitted: list[dict[str, Any]]) -> None:
    config = config_with("alerts: {patience_rounds: 2, dropout_share: 0.25}\n")
    alerts.round_committed(config, "r1", 3, 0.8, 4, 2, [0.9, 0.85, 0.8])
    assert [e["event"] for e in emitted] == [
        "fedround.round.committed",
        "fedround.round.dropout",
        "fedround.run.plateau",
    ]
    assert {e["resource"]["prefect.resource.id"] for e in emitted} == {"fedround.run.fed.r1"}
    committed, dropped, plateaued = (e["payload"] for e in emitted)
    assert committed == {
        "round": 3,
        "metric": "accuracy",
        "value": 0.8,
        "sites_selected": 4,
        "sites_accepted": 2,
        "message": "round 3: 2/4 sites, accuracy 0.8",
    }
    assert dropped == {
        "round": 3,
        "sites_selected": 4,
        "sites_accepted": 2,
        "dropout_share": 0.25,
        "message": "2 of 4 selected sites did not contribute (50% > 25%)",
    }
    assert plateaued == {
        "round": 3,
        "metric": "accuracy",
        "value": 0.8,
        "patience_rounds": 2,
        "message": "accuracy: no improvement for 2 rounds: best 0.9 (higher is better) "
        "was 2 rounds ago, latest 0.8",
    }


def test_a_quiet_round_emits_only_its_commit(emitted: list[dict[str, Any]]) -> None:
    alerts.round_committed(config_with(), "r1", 1, math.nan, 2, 2, [math.nan])
    assert [e["event"] for e in emitted] == ["fedround.round.committed"]
    assert emitted[0]["payload"]["value"] is None  # JSON has no nan


def test_disabled_alerts_still_record_commits(emitted: list[dict[str, Any]]) -> None:
    config = config_with("alerts: {enabled: false, patience_rounds: 1}\n")
    alerts.round_committed(config, "r1", 2, 0.1, 2, 0, [0.5, 0.1])
    assert [e["event"] for e in emitted] == ["fedround.round.committed"]


def test_run_lifecycle_events(emitted: list[dict[str, Any]]) -> None:
    config = config_with()
    alerts.run_started(config, "r1")
    alerts.run_finished(config, "r1", ok=False, reason="QuorumNotReached: round 2")
    alerts.run_finished(config, "r1", ok=True, reason=None)
    alerts.promotion_gate_failed(config, "fed-global", "4", ["quorum: 1 of 2 sites"])
    assert [(e["event"], e["payload"]) for e in emitted] == [
        (
            "fedround.run.started",
            {
                "run_id": "r1",
                "rounds": 30,
                "mode": "sync",
                "message": "run r1 of fed started (30 rounds)",
            },
        ),
        (
            "fedround.run.failed",
            {"reason": "QuorumNotReached: round 2", "message": "QuorumNotReached: round 2"},
        ),
        (
            "fedround.run.finished",
            {
                "ok": False,
                "reason": "QuorumNotReached: round 2",
                "message": "run r1 failed: QuorumNotReached: round 2",
            },
        ),
        ("fedround.run.finished", {"ok": True, "reason": None, "message": "run r1 finished"}),
        (
            "fedround.promotion.gate-failed",
            {
                "model": "fed-global",
                "version": "4",
                "reasons": ["quorum: 1 of 2 sites"],
                "message": "quorum: 1 of 2 sites",
            },
        ),
    ]
    assert emitted[-1]["resource"]["prefect.resource.id"] == "fedround.model.fed-global.4"


def test_emitting_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.events

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("no events for you")

    monkeypatch.setattr(prefect.events, "emit_event", broken)
    config = config_with("alerts: {patience_rounds: 1}\n")
    alerts.run_started(config, "r1")
    alerts.round_committed(config, "r1", 2, 0.1, 2, 0, [0.5, 0.1])
    alerts.run_finished(config, "r1", ok=False, reason="boom")
    alerts.promotion_gate_failed(config, "m", "1", [])


def test_metric_history_of_a_resumed_run(tmp_path: Path) -> None:
    settings = ObjectStoreSettings(kind="local", root=tmp_path)
    store = open_store(settings)
    weights = {"w": torch.zeros(2)}
    for round_, metrics in enumerate([{}, {"accuracy": 0.5}, {"loss": 1.0}, {"accuracy": 0.7}]):
        save_checkpoint(
            store,
            federation="fed",
            run_id="r1",
            round_=round_,
            weights=weights,
            strategy="fedavg",
            strategy_state={},
            config_sha256="0" * 64,
            metrics=metrics,
        )
    config = config_with()
    history = alerts.metric_history(settings, config, "r1", before=4)
    assert history[0] == 0.5 and math.isnan(history[1]) and history[2] == 0.7
    assert alerts.metric_history(settings, config, "r1", before=3)[0] == 0.5
    assert alerts.metric_history(settings, config, "r1", before=1) == []
    assert alerts.metric_history(settings, config, "nope", before=5) == []
    broken = ObjectStoreSettings(kind="local")  # no root: logged, never raised
    assert alerts.metric_history(broken, config, "r1", before=4) == []


# --- notification blocks and the deploy-time check ---------------------------------------


def test_webhook_block_posts_subject_and_body() -> None:
    config = config_with("alerts: {webhook: 'https://hooks.example.org/f'}\n")
    blocks = alerts.notification_blocks(config, environ={})
    block = blocks["fedround-fed-webhook"]
    assert block.get_block_type_slug() == "custom-webhook"
    request = block._build_request_args(body="B", subject="S")  # type: ignore[attr-defined]
    assert request["url"] == "https://hooks.example.org/f"
    assert request["json"] == {"subject": "S", "body": "B", "federation": "fed", "tenant": "acme"}


def test_email_needs_a_sendgrid_key_where_deploy_runs() -> None:
    config = config_with("alerts: {email: [ops@example.org], email_sender: fl@example.org}\n")
    with pytest.raises(ConfigError, match=r"alerts\.email: .*FEDROUND_SENDGRID_API_KEY"):
        alerts.check_alerts(config, environ={})
    blocks = alerts.notification_blocks(config, environ={"FEDROUND_SENDGRID_API_KEY": "SG.x"})
    email = blocks["fedround-fed-email"]
    assert email.get_block_type_slug() == "sendgrid-email"
    assert (email.sender_email, email.to_emails) == ("fl@example.org", ["ops@example.org"])  # type: ignore[attr-defined]
    # Switched off: nothing is sent, so nothing is needed.
    alerts.check_alerts(
        config_with(
            "alerts: {enabled: false, email: [ops@example.org], email_sender: fl@example.org}\n"
        ),
        environ={},
    )


def test_deploy_refuses_undeliverable_alerts_before_creating_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fedround.flows import deploy as deploying

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("created something")

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.delenv("FEDROUND_SENDGRID_API_KEY", raising=False)
    monkeypatch.setattr(deploying, "ensure_work_pools", must_not_run)
    monkeypatch.setattr(deploying.subprocess, "run", must_not_run)
    config = config_with("alerts: {email: [ops@example.org], email_sender: fl@example.org}\n")
    with pytest.raises(ConfigError, match=r"alerts\.email"):
        deploying.deploy(config, tmp_path / "fed.yaml", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
