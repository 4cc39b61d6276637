"""The federation config: defaults work, errors name the field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedround.tasks.core.config import (
    load_contract_suite,
    load_federation_config,
    parse_federation_config,
)
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.keys import check_run_id

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


@pytest.mark.security("hostile-config-input")
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


# model, data, training, evaluation and strategy sections -------------------------------------

TABLE_DATA = (
    "data: {kind: table, source: sites, table: {features: [age, city], categorical: [city], "
    "label: y}}\n"
)


def test_legacy_model_spelling_still_builds_the_cnn() -> None:
    config = parse_federation_config(MINIMAL + "model: {architecture: mnist_cnn}\n")
    assert config.model.factory == "mnist_cnn"
    assert config.model.import_path == "fedround.tasks.core.models:mnist_cnn"
    assert config.model.kwargs == {"conv1": 16, "conv2": 32, "hidden": 64}
    assert config.model == parse_federation_config(MINIMAL).model


def test_model_keys_other_than_factory_are_its_keyword_arguments() -> None:
    config = parse_federation_config(
        MINIMAL + "model: {factory: mlp, hidden: [16], in_features: 8}\n"
    )
    assert config.model.kwargs == {"hidden": [16], "in_features": 8, "dropout": 0.0}
    user = parse_federation_config(MINIMAL + "model: {factory: 'acme.nets:build', width: 3}\n")
    assert (user.model.import_path, user.model.kwargs) == ("acme.nets:build", {"width": 3})
    assert user.model.with_kwargs(in_features=4).kwargs == {"width": 3, "in_features": 4}


@pytest.mark.parametrize("factory", ["resnet", "acme.nets", "acme nets:build", "acme.nets:"])
def test_an_unknown_factory_format_names_the_field(factory: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_federation_config(MINIMAL + f"model: {{factory: '{factory}'}}\n", "fed.yaml")
    message = str(info.value)
    assert message.startswith("fed.yaml: model:")
    assert f"factory {factory!r} is neither a built-in" in message
    assert "'my_package.models:build'" in message


def test_model_arguments_must_be_identifiers() -> None:
    with pytest.raises(
        ConfigError, match=r"model: .*must be Python identifiers, got \['bad-key'\]"
    ):
        parse_federation_config(MINIMAL + "model: {factory: mlp, bad-key: 1}\n")


def test_user_function_paths_are_checked_where_they_are_named() -> None:
    with pytest.raises(ConfigError, match=r"fed\.yaml: training\.train: String should match"):
        parse_federation_config(MINIMAL + "training: {train: acme.train}\n", "fed.yaml")
    with pytest.raises(ConfigError, match=r"evaluation\.evaluate: String should match"):
        parse_federation_config(MINIMAL + "evaluation: {evaluate: 'acme:'}\n")
    config = parse_federation_config(
        MINIMAL + "training: {train: 'acme.fit:train', timeout_s: 30}\n"
    )
    assert (config.training.train, config.training.timeout_s) == ("acme.fit:train", 30)


def test_a_table_federation_parses() -> None:
    config = parse_federation_config(MINIMAL + TABLE_DATA + "model: {factory: mlp}\n")
    assert config.data.table is not None
    assert config.data.table.numeric_features == ["age"]
    assert config.data.table.min_category_count == 5


def test_table_data_without_a_table_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"fed\.yaml: data: .*kind: table needs a table section"):
        parse_federation_config(MINIMAL + "data: {kind: table, source: sites}\n", "fed.yaml")


def test_a_table_section_needs_table_data_from_sites() -> None:
    with pytest.raises(ConfigError, match="a table section needs kind: table"):
        parse_federation_config(
            MINIMAL + "data: {source: sites, table: {features: [a], label: y}}\n"
        )
    with pytest.raises(ConfigError, match="use source: sites for tables"):
        parse_federation_config(MINIMAL + "data: {kind: table, table: {features: [a], label: y}}\n")


def test_categorical_columns_must_be_features() -> None:
    with pytest.raises(
        ConfigError,
        match=r"data\.table: .*categorical names columns that are not in features: \['zip'\]",
    ):
        parse_federation_config(
            MINIMAL + "data: {kind: table, source: sites, table: "
            "{features: [age], categorical: [zip], label: y}}\n"
        )


def test_the_label_cannot_be_a_feature() -> None:
    with pytest.raises(ConfigError, match=r"data\.table: .*label 'y' is also listed in features"):
        parse_federation_config(
            MINIMAL + "data: {kind: table, source: sites, table: {features: [age, y], label: y}}\n"
        )
    with pytest.raises(ConfigError, match=r"features lists columns more than once: \['age'\]"):
        parse_federation_config(
            MINIMAL
            + "data: {kind: table, source: sites, table: {features: [age, age], label: y}}\n"
        )


def test_an_unknown_metric_needs_a_direction() -> None:
    with pytest.raises(ConfigError) as info:
        parse_federation_config(MINIMAL + "evaluation: {metric: brier}\n", "fed.yaml")
    message = str(info.value)
    assert message.startswith("fed.yaml: evaluation:")
    assert "metric 'brier' has no known direction: add evaluation.directions" in message
    config = parse_federation_config(
        MINIMAL + "evaluation: {metric: brier, directions: {brier: lower}}\n"
    )
    assert config.metric_direction() == "lower"
    assert config.promotion_metric == "brier"


def test_known_metrics_have_their_direction() -> None:
    config = parse_federation_config(MINIMAL + "evaluation: {metric: rmse}\n")
    assert config.metric_direction() == "lower"
    assert config.metric_direction("auc") == "higher"
    overridden = parse_federation_config(
        MINIMAL + "evaluation: {metric: loss, directions: {loss: higher}}\n"
    )
    assert overridden.metric_direction() == "higher"


def test_a_promotion_metric_without_a_direction_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"promotion\.metric: metric 'calibration' has no known direction"
    ):
        parse_federation_config(MINIMAL + "promotion: {metric: calibration}\n")
    config = parse_federation_config(MINIMAL + "promotion: {metric: f1}\n")
    assert (config.promotion_metric, config.metric_direction()) == ("f1", "higher")


def test_fedprox_needs_mu_and_mu_needs_fedprox() -> None:
    with pytest.raises(ConfigError, match=r"strategy: .*fedprox needs mu > 0"):
        parse_federation_config(MINIMAL + "strategy: {name: fedprox}\n")
    with pytest.raises(ConfigError, match=r"strategy: .*mu applies to fedprox only"):
        parse_federation_config(MINIMAL + "strategy: {mu: 0.1}\n")
    with pytest.raises(ConfigError, match=r"strategy\.mu: "):
        parse_federation_config(MINIMAL + "strategy: {name: fedprox, mu: -1}\n")
    config = parse_federation_config(MINIMAL + "strategy: {name: fedprox, mu: 0.01}\n")
    assert (config.strategy.name, config.strategy.mu) == ("fedprox", 0.01)


def test_a_table_with_the_mnist_cnn_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.factory: mnist_cnn takes 28×28 images"):
        parse_federation_config(MINIMAL + TABLE_DATA)


def test_site_entries_may_name_their_site_config() -> None:
    config = parse_federation_config(
        "federation: f\ncontract: c\nsites: [{name: a, config: sites/a/site.yaml}]\n"
    )
    assert config.sites[0].config == "sites/a/site.yaml"


THREE_SITES = "federation: fed\ncontract: c.json\nsites: [{name: a}, {name: b}, {name: c}]\n"


def test_async_mode_defaults_and_concurrency() -> None:
    config = parse_federation_config(THREE_SITES + "mode: async\n")
    assert config.mode == "async"
    assert (config.async_.buffer_size, config.async_.max_staleness) == (2, 5)
    assert config.async_concurrency == 3  # fraction 1.0 of 3 sites
    half = parse_federation_config(THREE_SITES + "mode: async\nselection: {fraction: 0.3}\n")
    assert half.async_concurrency == 2  # never fewer than K
    assert parse_federation_config(THREE_SITES).mode == "sync"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("async: {buffer_size: 4}", "async.buffer_size=4 is more than the 3 sites"),
        ("async: {max_staleness: 0}", "async.max_staleness: Input should be greater than or equal"),
        ("async: {buffer_size: 0}", "async.buffer_size: Input should be greater than or equal"),
        ("async: {concurrency: 5}", "async.concurrency=5 is more than the 3 sites"),
        ("async: {buffer_size: 3, concurrency: 2}", "async.concurrency=2 is less than"),
        ("strategy: {aggregator: krum}", "mode: async does not support strategy.aggregator: krum"),
        ("strategy: {name: scaffold}", "mode: async does not support strategy.name: scaffold"),
        ("async: {stalenes: 2}", "async.stalenes: Extra inputs are not permitted"),
    ],
)
def test_async_settings_that_cannot_work_name_the_field(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_federation_config(THREE_SITES + "mode: async\n" + extra + "\n")


def test_unknown_mode_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="mode: Input should be 'sync' or 'async'"):
        parse_federation_config(THREE_SITES + "mode: buffered\n")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("selection: {deadline_s: .inf}", "selection.deadline_s"),
        ("selection: {liveness_s: .nan}", "selection.liveness_s"),
        ("training: {learning_rate: .inf}", "training.learning_rate"),
        ("limits: {max_update_norm: .inf}", "limits.max_update_norm"),
        ("promotion: {min_gain: -.inf}", "promotion.min_gain"),
    ],
)
@pytest.mark.security("hostile-config-input")
def test_infinite_or_nan_settings_are_refused_with_the_field(extra: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: Input should be a finite number"):
        parse_federation_config(MINIMAL + extra + "\n")


@pytest.mark.parametrize("run_id", ["../other", "a/b", "", "-x", "x" * 101, "a..b", "名前"])
@pytest.mark.security("hostile-config-input")
def test_a_run_id_that_cannot_name_a_run_is_refused(run_id: str) -> None:
    with pytest.raises(ConfigError, match="cannot name a run: use 1-100 letters"):
        check_run_id(run_id)


def test_good_run_ids_pass() -> None:
    for run_id in ["20261201-040239-ef16", "nightly_2026.12.01", "A1"]:
        assert check_run_id(run_id) == run_id


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist: write the suite there"),
        ("{not json", "is not valid JSON"),
        ('["a"]', "is not a suite: expected a JSON object with an 'expectations' list"),
        ('{"name": "s"}', "is not a suite"),
    ],
)
@pytest.mark.security("hostile-config-input")
def test_a_missing_or_broken_contract_is_a_config_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text(MINIMAL)
    if content is not None:
        (tmp_path / "c.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_contract_suite(path, load_federation_config(path))


def test_a_good_contract_is_read(tmp_path: Path) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text(MINIMAL)
    (tmp_path / "c.json").write_text('{"name": "s", "expectations": []}')
    assert load_contract_suite(path, load_federation_config(path))["name"] == "s"
