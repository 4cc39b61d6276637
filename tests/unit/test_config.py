"""The federation config: defaults work, errors name the field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedround.tasks.core.config import load_federation_config, parse_federation_config
from fedround.tasks.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "federation: fed\ncontract: c.json\nsites: [{name: a}, {name: b}]\n"


def test_demo_config_is_valid_and_matches_the_demo() -> None:
    config = load_federation_config(REPO / "deployments/examples/mnist-demo.yaml")
    assert len(config.sites) == 10
    assert config.rounds == 30
    assert config.data.partition.alpha == 0.5
    assert (config.training.batch_size, config.training.learning_rate) == (32, 0.05)
    assert config.model_name == "mnist-demo-global"
    assert config.work_pool("site-03") == "mnist-demo-site-03"


def test_minimal_config_gets_working_defaults() -> None:
    config = parse_federation_config(MINIMAL)
    assert config.strategy.name == "fedavg"
    assert config.data.train_size == 4000


def test_unknown_strategy_names_the_field_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        parse_federation_config(MINIMAL + "strategy: {name: fedavgg}\n", "fed.yaml")
    message = str(info.value)
    assert "fed.yaml: strategy.name" in message
    assert "'fedavg'" in message and "'fedavgg'" in message


def test_typo_in_a_field_name_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"training\.learnig_rate: Extra inputs"):
        parse_federation_config(MINIMAL + "training: {learnig_rate: 0.1}\n")


def test_bad_values_are_all_reported_with_their_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_federation_config(MINIMAL + "rounds: 0\nselection: {fraction: 1.5}\n", "fed.yaml")
    lines = str(info.value).splitlines()
    assert any(line.startswith("fed.yaml: rounds:") and "(got 0)" in line for line in lines)
    assert any(line.startswith("fed.yaml: selection.fraction:") for line in lines)


def test_quorum_larger_than_the_federation_is_refused() -> None:
    with pytest.raises(ConfigError, match="min_sites=3 is more than the 2 sites"):
        parse_federation_config(MINIMAL + "selection: {min_sites: 3}\n")


def test_duplicate_and_invalid_site_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="repeated"):
        parse_federation_config("federation: f\ncontract: c\nsites: [{name: a}, {name: a}]\n")
    with pytest.raises(ConfigError, match=r"sites\.0\.name"):
        parse_federation_config("federation: f\ncontract: c\nsites: [{name: Site_A}]\n")


def test_not_yaml_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_federation_config("federation: [unclosed")
    with pytest.raises(ConfigError, match="cannot read federation config"):
        load_federation_config(tmp_path / "absent.yaml")


def test_schedule_is_validated() -> None:
    config = parse_federation_config(
        MINIMAL + "schedule: {cron: '30 1 * * *', timezone: Europe/Berlin}\n"
    )
    assert (config.schedule.cron, config.schedule.timezone) == ("30 1 * * *", "Europe/Berlin")
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        parse_federation_config(MINIMAL + "schedule: {timezone: Mars/Olympus}\n")
    with pytest.raises(ConfigError, match="five fields"):
        parse_federation_config(MINIMAL + "schedule: {cron: '@daily'}\n")
