"""Adaptive clipping for central DP-FedAvg (tasks/core/privacy/adaptive_clipping.py): the
noise split between count and sum, the geometric update of C, C converging to the target
quantile of the norms, C surviving a checkpoint, and the config's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from fedround.tasks.core.config import PrivacyConfig, StrategyConfig, parse_federation_config
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.hooks import hooks_for
from fedround.tasks.core.privacy.adaptive_clipping import (
    AdaptiveClipping,
    next_clip_norm,
    update_noise_multiplier,
)
from fedround.tasks.core.privacy.dp_fedavg import CLIP_STATE_KEY, CentralDP, wrap_strategy
from fedround.tasks.core.strategies import build_strategy

MINIMAL = "federation: fed\ncontract: c.json\nsites: [{name: a}, {name: b}, {name: c}]\n"


def _update(norm: float, size: int = 4) -> dict[str, torch.Tensor]:
    return {"w": torch.full((size,), norm / math.sqrt(size))}


@pytest.mark.parametrize(("z", "sigma_b"), [(1.0, 5.0), (1.0, 1.0), (0.7, 0.4), (3.0, 100.0)])
def test_count_and_sum_together_are_one_gaussian_mechanism_at_z(z: float, sigma_b: float) -> None:
    z_sum = update_noise_multiplier(z, sigma_b)
    # Andrew et al., Theorem 1: z⁻² = z_Δ⁻² + (2σ_b)⁻²
    assert z_sum**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    assert z_sum > z


def test_a_count_noise_of_half_z_or_less_is_refused() -> None:
    with pytest.raises(ValueError, match="more than half"):
        update_noise_multiplier(2.0, 1.0)


def test_the_default_count_noise_is_m_over_20_and_never_below_z() -> None:
    settings = AdaptiveClipping()
    assert settings.count_noise(1.0, 100) == pytest.approx(5.0)
    assert settings.count_noise(1.0, 4) == pytest.approx(1.0)
    assert AdaptiveClipping(count_noise_multiplier=2.5).count_noise(1.0, 100) == 2.5


@pytest.mark.parametrize(
    "fields", [{"target_quantile": 0.0}, {"target_quantile": 1.0}, {"learning_rate": 0.0}]
)
def test_adaptive_settings_out_of_range_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        AdaptiveClipping(**fields)


def test_c_shrinks_when_all_updates_fit_and_grows_when_none_do() -> None:
    settings = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)
    generator = torch.Generator().manual_seed(0)
    down, fraction = next_clip_norm(1.0, 10, 10, settings, 1e-12, generator)
    up, _ = next_clip_norm(1.0, 0, 10, settings, 1e-12, generator)
    assert fraction == pytest.approx(1.0)
    assert down == pytest.approx(math.exp(-0.2 * 0.5))
    assert up == pytest.approx(math.exp(0.2 * 0.5))
    with pytest.raises(ValueError, match="11 unclipped updates of 10"):
        next_clip_norm(1.0, 11, 10, settings, 1.0, generator)


def _run_rounds(strategy: CentralDP, norms: list[float], rounds: int) -> list[float]:
    seen = []
    for round_ in range(rounds):
        strategy.seed = 1000 + round_  # a run derives each round's noise seed anew
        strategy.begin_round({"w": torch.zeros(4)})
        for norm in norms:
            strategy.accumulate(_update(norm), 1)
        strategy.finish()
        seen.append(strategy.clip_norm)
        state = strategy.state_dict()  # what the checkpoint keeps, for the next round
        strategy.load_state_dict(state)
    return seen


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_c_converges_to_the_target_quantile_of_the_update_norms(quantile: float) -> None:
    norms = [0.1 * (i + 1) for i in range(100)]  # 0.1 … 10.0: the q-quantile is ≈ 10·q
    strategy = CentralDP(
        build_strategy("fedavg"),
        noise_multiplier=1.0,
        clip_norm=0.05,  # far off, on purpose
        expected_sites=100,
        seed=7,
        adaptive=AdaptiveClipping(target_quantile=quantile, learning_rate=0.2),
    )
    seen = _run_rounds(strategy, norms, 120)
    late = seen[-20:]
    assert sum(late) / len(late) == pytest.approx(10 * quantile, rel=0.1)
    assert seen[0] == 0.05  # the first round clips at the configured C


def test_the_sum_is_noised_with_the_raised_multiplier() -> None:
    strategy = CentralDP(build_strategy("fedavg"), 1.0, 1.0, 5, seed=3, adaptive=AdaptiveClipping())
    strategy.begin_round({"w": torch.zeros(100_000)})
    strategy.accumulate({"w": torch.zeros(100_000)}, 1)
    delta = strategy.finish()["w"]
    z_sum = update_noise_multiplier(1.0, 1.0)  # σ_b = max(5/20, 1) = 1
    assert strategy.noise_stddev == pytest.approx(z_sum / 5)
    assert float(delta.std()) == pytest.approx(z_sum / 5, rel=0.02)


def test_the_clip_norm_is_checkpointed_only_when_adaptive() -> None:
    settings = AdaptiveClipping()
    adaptive = wrap_strategy(build_strategy("fedavg"), "central", 1.0, 1.0, 3, 0, settings)
    fixed = wrap_strategy(build_strategy("fedavg"), "central", 1.0, 1.0, 3, 0)
    for strategy in (adaptive, fixed):
        strategy.begin_round({"w": torch.zeros(4)})
        strategy.accumulate(_update(5.0), 1)
        strategy.finish()
    state = adaptive.state_dict()
    assert CLIP_STATE_KEY not in fixed.state_dict()
    assert state[CLIP_STATE_KEY] > 1.0  # no update fitted: C grew

    resumed = wrap_strategy(build_strategy("fedavg"), "central", 1.0, 1.0, 3, 0, settings)
    resumed.load_state_dict(state)
    assert isinstance(resumed, CentralDP) and resumed.clip_norm == state[CLIP_STATE_KEY]
    with pytest.raises(ValueError, match="not a number > 0"):
        resumed.load_state_dict({CLIP_STATE_KEY: float("nan")})
    with pytest.raises(ValueError, match="needs mode: central"):
        wrap_strategy(build_strategy("fedavg"), "local", 1.0, 1.0, 3, 0, AdaptiveClipping())


def test_sites_do_not_clip_when_the_coordinator_adapts_c() -> None:
    privacy = PrivacyConfig(
        mode="central",
        noise_multiplier=1.0,
        clip_norm=1.0,
        adaptive_clipping={"target_quantile": 0.5},  # type: ignore[arg-type]
    )
    assert hooks_for(StrategyConfig(), {}, privacy, seed=1) == []


@pytest.mark.parametrize(
    ("section", "hint"),
    [
        (
            "{mode: local, noise_multiplier: 1.0, clip_norm: 1.0, adaptive_clipping: {}}",
            "adaptive_clipping needs mode: central",
        ),
        (
            "{mode: central, noise_multiplier: 2.0, clip_norm: 1.0, "
            "adaptive_clipping: {count_noise_multiplier: 1.0}}",
            "must be more than half of noise_multiplier",
        ),
        ("{mode: off, adaptive_clipping: {}}", "adaptive_clipping apply to mode"),
        (
            "{mode: central, noise_multiplier: 1.0, clip_norm: 1.0, "
            "adaptive_clipping: {target_quantile: 1.5}}",
            "target_quantile",
        ),
    ],
)
def test_bad_adaptive_clipping_settings_name_the_field(section: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        parse_federation_config(MINIMAL + f"privacy: {section}\n")


def test_a_valid_adaptive_section_parses_with_its_defaults() -> None:
    config = parse_federation_config(
        MINIMAL + "privacy: {mode: central, noise_multiplier: 1.0, clip_norm: 0.5, "
        "adaptive_clipping: {}}\n"
    )
    adaptive = config.privacy.adaptive_clipping
    assert adaptive is not None
    assert (adaptive.target_quantile, adaptive.learning_rate) == (0.5, 0.2)
    assert adaptive.count_noise_multiplier is None
