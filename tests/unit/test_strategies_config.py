"""The strategy section of a federation config: every option, its range, where it applies,
and the round-size checks that refuse, before the run starts, what a round could not do."""

from __future__ import annotations

import pytest

from fedround.tasks.core.config import StrategyConfig, parse_federation_config
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.strategies import (
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    MultiKrum,
    TrimmedMean,
    WeightedMean,
    build_strategy,
)


def _config(strategy: str, sites: int = 8, min_sites: int = 1):
    names = ", ".join(f"{{name: s{i}}}" for i in range(sites))
    return parse_federation_config(
        "federation: fed\ncontract: c.json\n"
        f"sites: [{names}]\nselection: {{min_sites: {min_sites}}}\nstrategy: {strategy}\n",
        "fed.yaml",
    )


def _error(strategy: str, sites: int = 8, min_sites: int = 1) -> str:
    with pytest.raises(ConfigError) as caught:
        _config(strategy, sites, min_sites)
    return str(caught.value)


def test_existing_configs_keep_working() -> None:
    default = _config("{name: fedavg}").strategy
    assert (
        default.name,
        default.aggregator,
        default.clip.mode,
        default.clip.effective_multiplier,
    ) == (
        "fedavg",
        "mean",
        "median",
        5.0,
    )
    strategy = build_strategy(default)
    assert isinstance(strategy.optimizer, FedAvg) and strategy.optimizer.server_lr == 1.0
    assert isinstance(strategy.aggregator, WeightedMean)
    fedprox = build_strategy(_config("{name: fedprox, mu: 0.01}").strategy)
    assert isinstance(fedprox.optimizer, FedProx)


def test_each_name_and_aggregator_builds_with_its_hyperparameters() -> None:
    momentum = build_strategy(_config("{name: fedavgm, momentum: 0.8, server_lr: 0.5}").strategy)
    assert isinstance(momentum.optimizer, FedAvgM)
    assert (momentum.optimizer.momentum, momentum.optimizer.server_lr) == (0.8, 0.5)
    adam = build_strategy(_config("{name: fedadam, beta2: 0.9, tau: 0.01}").strategy).optimizer
    assert isinstance(adam, FedAdam)
    assert (adam.server_lr, adam.beta1, adam.beta2, adam.tau) == (0.01, 0.9, 0.9, 0.01)
    yogi = build_strategy(_config("{name: fedyogi, aggregator: median}").strategy)
    assert isinstance(yogi.optimizer, FedYogi) and isinstance(yogi.aggregator, CoordinateMedian)
    trimmed = build_strategy(_config("{aggregator: trimmed_mean, trim_beta: 0.2}").strategy)
    assert isinstance(trimmed.aggregator, TrimmedMean) and trimmed.aggregator.beta == 0.2
    krum = build_strategy(
        _config("{aggregator: multi_krum, krum_f: 2, multi_krum_m: 3}", min_sites=7).strategy
    )
    assert isinstance(krum.aggregator, MultiKrum)
    assert (krum.aggregator.f, krum.aggregator.m) == (2, 3)
    capped = build_strategy(
        _config(
            "{weighting: uniform, max_site_share: 0.5, clip: {mode: off}}", min_sites=2
        ).strategy
    )
    assert (capped.weighting.mode, capped.weighting.max_share) == ("uniform", 0.5)
    assert capped.clipping.mode == "off" and capped.needs_preview  # the cap needs the round


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("{name: fedsgd}", "fed.yaml: strategy.name: Input should be 'fedavg', 'fedprox'"),
        ("{name: fedprox, mu: -1}", "strategy.mu: Input should be greater than or equal to 0"),
        (
            "{trim_beta: 0.5, aggregator: trimmed_mean}",
            "strategy.trim_beta: Input should be less than 0.5",
        ),
        ("{server_lr: 0}", "strategy.server_lr: Input should be greater than 0"),
        ("{name: fedavgm, momentum: 1.0}", "strategy.momentum: Input should be less than 1"),
        (
            "{name: fedadam, beta1: -0.1}",
            "strategy.beta1: Input should be greater than or equal to 0",
        ),
        ("{name: fedyogi, tau: 0}", "strategy.tau: Input should be greater than 0"),
        (
            "{max_site_share: 1.5}",
            "strategy.max_site_share: Input should be less than or equal to 1",
        ),
        (
            "{clip: {multiplier: 0.5}}",
            "strategy.clip.multiplier: Input should be greater than or equal to 1",
        ),
        (
            "{aggregator: mode}",
            "strategy.aggregator: Input should be 'mean', 'median', 'trimmed_mean'",
        ),
        ("{weighting: sizes}", "strategy.weighting: Input should be 'examples' or 'uniform'"),
        ("{learning_rate: 0.1}", "unknown option(s) ['learning_rate']; strategy takes ["),
        ("{clip: {mode: fixed}}", "strategy.clip: Value error, mode: fixed needs bound > 0"),
        ("{clip: {mode: off, multiplier: 3}}", "multiplier applies to mode: median (mode is off)"),
        ("{clip: {bound: 3}}", "bound applies to mode: fixed (mode is median)"),
    ],
)
def test_bad_options_name_the_field_and_the_allowed_range(strategy: str, expected: str) -> None:
    assert expected in _error(strategy)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("{momentum: 0.9}", "momentum applies to name: fedavgm only"),
        (
            "{name: fedavgm, beta1: 0.9}",
            "beta1 applies to name: fedadam, fedyogi or fedadagrad only",
        ),
        ("{name: fedadagrad, beta2: 0.9}", "beta2 applies to name: fedadam or fedyogi only"),
        ("{trim_beta: 0.1}", "trim_beta applies to aggregator: trimmed_mean only"),
        (
            "{aggregator: median, krum_f: 1}",
            "krum_f applies to aggregator: krum or multi_krum only",
        ),
        (
            "{aggregator: krum, multi_krum_m: 2}",
            "multi_krum_m applies to aggregator: multi_krum only",
        ),
        ("{name: fedadam, mu: 0.1}", "mu applies to fedprox only"),
    ],
)
def test_options_that_do_not_apply_are_refused(strategy: str, expected: str) -> None:
    assert expected in _error(strategy)


@pytest.mark.parametrize(
    "strategy",
    [
        "{name: fedavg}",
        "{name: fedprox, mu: 0.1, clip: {mode: off}}",
        "{name: fedadam, beta2: 0.9, clip: {mode: fixed, bound: 3}}",
        "{name: fedavgm, aggregator: multi_krum, krum_f: 1, multi_krum_m: 2}",
        "{aggregator: trimmed_mean, trim_beta: 0.2, clip: {multiplier: 3}}",
    ],
)
def test_a_strategy_section_survives_the_trip_to_a_site(strategy: str) -> None:
    # Round specs carry the strategy to the sites as JSON; it must validate there again.
    config = _config(strategy, min_sites=5).strategy
    assert StrategyConfig.model_validate_json(config.model_dump_json()) == config


def test_krum_is_refused_when_a_quorum_round_could_not_run_it() -> None:
    # f = 1 needs n > 4 valid updates; a quorum of 4 could close a round with 4.
    message = _error("{aggregator: krum}", sites=8, min_sites=4)
    assert "strategy.aggregator: krum with krum_f=1 needs more than 2·f + 2 = 4" in message
    assert "raise selection.min_sites to at least 5" in message
    assert _config("{aggregator: krum}", sites=8, min_sites=5).strategy.effective_krum_f == 1
    message = _error("{aggregator: multi_krum, krum_f: 1, multi_krum_m: 5}", min_sites=5)
    assert "strategy.multi_krum_m=5 is more than selection.min_sites − krum_f = 4" in message


def test_robust_aggregators_are_refused_beyond_their_memory_bound() -> None:
    message = _error("{aggregator: median, max_buffered_updates: 6}", sites=8)
    assert "strategy.aggregator: median holds a round's updates in memory together" in message
    assert "strategy.max_buffered_updates=6" in message
    assert _config("{aggregator: median, max_buffered_updates: 8}", sites=8)


def test_a_site_share_cap_the_quorum_cannot_satisfy_is_refused() -> None:
    message = _error("{max_site_share: 0.3}", sites=8, min_sites=3)
    assert "strategy.max_site_share=0.3 cannot hold in a round of selection.min_sites=3" in message
    assert "raise selection.min_sites to 4 or max_site_share to at least 1/3" in message
    assert _config("{max_site_share: 0.25}", sites=8, min_sites=4).strategy.max_site_share == 0.25
