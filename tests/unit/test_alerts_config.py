"""The ``alerts:`` section: defaults on, channels checked, nonsense refused naming the field."""

from __future__ import annotations

import pytest

from fedround.tasks.core.config import AlertsConfig, parse_federation_config
from fedround.tasks.core.errors import ConfigError

MINIMAL = "federation: fed\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"


def parse_alerts(section: str) -> AlertsConfig:
    return parse_federation_config(MINIMAL + f"alerts: {section}\n", "fed.yaml").alerts


def refused(section: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_alerts(section)
    return str(info.value)


def test_defaults_are_on_with_no_channel() -> None:
    alerts = parse_federation_config(MINIMAL).alerts
    assert alerts == AlertsConfig()
    assert alerts.enabled is True
    assert (alerts.webhook, alerts.email, alerts.channels) == (None, [], [])
    assert (alerts.stall_after_s, alerts.dropout_share, alerts.patience_rounds) == (1800, 0.5, 5)


def test_webhook_and_email_channels() -> None:
    alerts = parse_alerts(
        "{webhook: 'https://hooks.example.org/fed?x=1', email: [ops@example.org, "
        "a.b+c@mail.example.co.uk], email_sender: alerts@example.org}"
    )
    assert alerts.webhook == "https://hooks.example.org/fed?x=1"
    assert alerts.email == ["ops@example.org", "a.b+c@mail.example.co.uk"]
    assert alerts.channels == ["webhook", "email"]
    assert parse_alerts("{webhook: 'http://127.0.0.1:8080/hook'}").channels == ["webhook"]


@pytest.mark.parametrize(
    "url",
    ["ftp://example.org/x", "example.org/hook", "https://", "http://host:99999/x", "not a url"],
)
def test_a_malformed_webhook_is_refused_naming_the_field(url: str) -> None:
    assert "fed.yaml: alerts.webhook:" in refused(f"{{webhook: '{url}'}}")


@pytest.mark.parametrize("address", ["ops", "ops@", "@example.org", "ops@localhost", "a b@x.org"])
def test_a_malformed_address_is_refused_naming_the_field(address: str) -> None:
    message = refused(f"{{email: ['{address}'], email_sender: s@example.org}}")
    assert "fed.yaml: alerts.email:" in message and repr(address) in message


def test_repeated_address_and_bad_sender_are_refused() -> None:
    assert "more than once: ['a@x.org']" in refused(
        "{email: [a@x.org, a@x.org], email_sender: s@x.org}"
    )
    assert "alerts.email_sender:" in refused("{email: [a@x.org], email_sender: nobody}")


def test_email_needs_a_sender() -> None:
    assert "alerts: Value error, email needs email_sender" in refused("{email: [a@x.org]}")


def test_an_unknown_channel_is_refused_naming_it() -> None:
    assert "fed.yaml: alerts.slack: Extra inputs are not permitted" in refused(
        "{slack: 'https://hooks.slack.com/x'}"
    )
    message = refused("{email: [a@x.org], email_sender: s@x.org, email_via: smtp}")
    assert "alerts.email_via:" in message and "'sendgrid'" in message


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("{dropout_share: 0}", "alerts.dropout_share"),
        ("{dropout_share: 1.5}", "alerts.dropout_share"),
        ("{dropout_share: -0.1}", "alerts.dropout_share"),
        ("{dropout_share: .nan}", "alerts.dropout_share"),
        ("{patience_rounds: 0}", "alerts.patience_rounds"),
        ("{patience_rounds: -3}", "alerts.patience_rounds"),
        ("{stall_after_s: 0}", "alerts.stall_after_s"),
        ("{stall_after_s: -5}", "alerts.stall_after_s"),
        ("{stall_after_s: 9.5}", "alerts.stall_after_s"),  # Prefect's proactive minimum
        ("{stall_after_s: .inf}", "alerts.stall_after_s"),
        ("{enabled: maybe}", "alerts.enabled"),
    ],
)
def test_nonsense_values_are_refused_naming_the_field(section: str, field: str) -> None:
    assert f"fed.yaml: {field}:" in refused(section)


def test_share_of_one_is_allowed() -> None:
    assert parse_alerts("{dropout_share: 1}").dropout_share == 1.0


def test_stall_window_must_outlast_the_round_deadline_when_set() -> None:
    with pytest.raises(ConfigError, match=r"alerts\.stall_after_s=600 is not more than"):
        parse_federation_config(MINIMAL + "alerts: {stall_after_s: 600}\n")
    config = parse_federation_config(
        MINIMAL + "selection: {deadline_s: 5}\nalerts: {stall_after_s: 10}\n"
    )
    assert config.alerts.stall_after_s == 10
    # The default window is not checked against a long deadline the user set.
    long = parse_federation_config(MINIMAL + "selection: {deadline_s: 7200}\n")
    assert long.alerts.stall_after_s == 1800


def test_alerts_can_be_switched_off() -> None:
    assert parse_alerts("{enabled: false, webhook: 'https://x.org/h'}").enabled is False
