"""DP-FedAvg (tasks/core/privacy/dp_fedavg.py): clipping norms, the noise's scale (a
statistical check), the central and local wrappers against exact expected arrays, the
site hooks, and the ``privacy:`` config section's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from fedround.tasks.core.config import PrivacyConfig, StrategyConfig, parse_federation_config
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.hooks import apply_update_hooks, hooks_for
from fedround.tasks.core.privacy.dp_fedavg import (
    CentralDP,
    ClipUpdate,
    LocalDPMean,
    LocalNoise,
    add_noise,
    clip_update,
    gaussian_noise,
    noise_generator,
    wrap_strategy,
)
from fedround.tasks.core.strategies import AggregationError, build_strategy, update_norm

MINIMAL = "federation: fed\ncontract: c.json\nsites: [{name: a}, {name: b}, {name: c}]\n"
CENTRAL = "privacy: {mode: central, noise_multiplier: 1.0, clip_norm: 1.0}\n"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- clipping -----------------------------------------------------------------------------


def test_clip_scales_a_long_update_to_exactly_the_bound() -> None:
    update = {"w": t(3.0, 0.0), "b": t(4.0), "steps": torch.tensor([7])}  # norm 5
    clipped, factor = clip_update(update, 1.0)
    assert factor == pytest.approx(0.2)
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(clipped["w"], t(0.6, 0.0))
    assert torch.equal(clipped["steps"], torch.tensor([7]))  # integer buffers untouched


def test_clip_leaves_a_short_update_alone() -> None:
    update = {"w": t(0.3, 0.4)}
    clipped, factor = clip_update(update, 1.0)
    assert factor == 1.0 and clipped["w"] is update["w"]


@pytest.mark.parametrize("bound", [0.0, -1.0, math.inf, math.nan])
def test_clip_refuses_a_bound_that_is_not_positive_and_finite(bound: float) -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update({"w": t(1.0)}, bound)


def test_clip_refuses_a_non_finite_update() -> None:
    with pytest.raises(ValueError, match="not finite"):
        clip_update({"w": t(math.inf)}, 1.0)


# --- noise --------------------------------------------------------------------------------


def test_noise_has_the_requested_standard_deviation_and_no_bias() -> None:
    noise = gaussian_noise({"w": torch.zeros(200_000)}, 0.5, noise_generator(7))["w"]
    # n = 2e5: the sample std's standard error is 0.5/sqrt(2n) ≈ 8e-4, the mean's 1.1e-3.
    assert float(noise.std()) == pytest.approx(0.5, abs=4e-3)
    assert abs(float(noise.mean())) < 5e-3
    kurtosis = float(((noise / noise.std()) ** 4).mean())
    assert kurtosis == pytest.approx(3.0, abs=0.1)  # Gaussian, not uniform or Laplace


def test_seeded_noise_is_reproducible_and_unseeded_noise_is_not() -> None:
    like = {"a": torch.zeros(5), "b": torch.zeros(3)}
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            gaussian_noise(like, 1.0, noise_generator(3)).values(),
            gaussian_noise(like, 1.0, noise_generator(3)).values(),
            strict=True,
        )
    )
    first = gaussian_noise(like, 1.0, noise_generator(None))["a"]
    second = gaussian_noise(like, 1.0, noise_generator(None))["a"]
    assert not torch.equal(first, second)


def test_noise_skips_integer_tensors() -> None:
    noised = add_noise({"w": torch.zeros(3), "n": torch.tensor([2])}, 1.0, noise_generator(0))
    assert torch.equal(noised["n"], torch.tensor([2]))
    assert noised["w"].dtype == torch.float32 and bool(noised["w"].abs().sum() > 0)


# --- central DP ----------------------------------------------------------------------------


def _central(expected_sites: int, seed: int = 0, sigma: float = 1.0) -> CentralDP:
    return CentralDP(build_strategy("fedavg"), sigma, 1.0, expected_sites, seed)


def test_central_dp_is_the_clipped_equal_sum_plus_noise_over_the_fixed_denominator() -> None:
    # Prepare
    global_weights = {"w": torch.zeros(2)}
    updates = [({"w": t(3.0, 4.0)}, 10), ({"w": t(0.5, 0.0)}, 1_000_000)]  # norms 5 and 0.5
    strategy = _central(expected_sites=4, seed=11)
    # Execute
    strategy.begin_round(global_weights)
    for update, count in updates:
        strategy.accumulate(update, count)
    new = strategy.finish()
    # Assert: (clip(u1) + u2 + N(0, σ²C²)) / 4, example counts ignored
    noise = gaussian_noise({"w": torch.zeros(2)}, 1.0, noise_generator(11))["w"]
    expected = (torch.tensor([0.6, 0.8], dtype=torch.float64) + t(0.5, 0.0).double() + noise) / 4
    assert torch.allclose(new["w"].double(), expected.float().double(), atol=1e-6)
    assert strategy.report.scales == pytest.approx([0.2, 1.0])
    assert strategy.report.norms == pytest.approx([5.0, 0.5])
    assert strategy.noise_stddev == pytest.approx(0.25)


def test_central_dp_noise_on_the_mean_is_sigma_c_over_the_expected_sites() -> None:
    strategy = _central(expected_sites=5, seed=3, sigma=2.0)
    strategy.begin_round({"w": torch.zeros(100_000)})
    strategy.accumulate({"w": torch.zeros(100_000)}, 1)
    delta = strategy.finish()["w"]
    assert float(delta.std()) == pytest.approx(2.0 * 1.0 / 5, rel=0.02)


def test_a_site_that_clipped_itself_is_not_reported_as_clipped() -> None:
    hook = ClipUpdate(1.0)
    sent = hook.update({"w": torch.randn(1000) * 10})
    strategy = _central(expected_sites=1)
    strategy.begin_round({"w": torch.zeros(1000)})
    strategy.accumulate(sent, 1)
    strategy.finish()
    assert strategy.report.scales == [1.0]


def test_central_dp_refuses_more_updates_than_its_denominator() -> None:
    strategy = _central(expected_sites=1)
    strategy.begin_round({"w": torch.zeros(1)})
    strategy.accumulate({"w": t(0.1)}, 1)
    strategy.accumulate({"w": t(0.1)}, 1)
    with pytest.raises(AggregationError, match="expected sites"):
        strategy.finish()


def test_central_dp_keeps_the_inner_optimizer_and_its_state() -> None:
    inner = build_strategy(StrategyConfig(name="fedavgm", momentum=0.5))
    strategy = wrap_strategy(inner, "central", 1.0, 1.0, 2, seed=0)
    strategy.begin_round({"w": torch.zeros(1)})
    strategy.accumulate({"w": t(0.1)}, 1)
    strategy.finish()
    assert strategy.name == "dp-fedavgm"
    assert strategy.state_dict().keys() == inner.state_dict().keys() != set()


def test_dp_refuses_to_wrap_a_robust_aggregator() -> None:
    with pytest.raises(ValueError, match="streaming"):
        CentralDP(build_strategy(StrategyConfig(aggregator="median")), 1.0, 1.0, 3)


# --- local DP ------------------------------------------------------------------------------


def test_local_noise_clips_then_adds_sigma_c_noise() -> None:
    hook = LocalNoise(noise_multiplier=0.5, clip_norm=2.0, seed=5)
    sent = hook.update({"w": torch.full((50_000,), 10.0)})
    expected_clipped = torch.full((50_000,), 2.0 / math.sqrt(50_000))
    residual = sent["w"].double() - expected_clipped.double()
    assert float(residual.std()) == pytest.approx(0.5 * 2.0, rel=0.02)
    assert hook.factor < 1


def test_local_dp_mean_is_the_plain_equal_mean_with_no_clipping() -> None:
    strategy = wrap_strategy(build_strategy("fedavg"), "local", 1.0, 1.0, 2)
    assert isinstance(strategy, LocalDPMean)
    strategy.begin_round({"w": torch.zeros(2)})
    strategy.accumulate({"w": t(30.0, 0.0)}, 1)
    strategy.accumulate({"w": t(0.0, 2.0)}, 999)
    assert torch.equal(strategy.finish()["w"], t(15.0, 1.0))


# --- the site's hooks ---------------------------------------------------------------------


def test_hooks_for_privacy_clip_centrally_and_noise_locally() -> None:
    central = PrivacyConfig(mode="central", noise_multiplier=1.0, clip_norm=1.0)
    hooks = hooks_for(StrategyConfig(), {}, central, seed=1)
    assert [type(h) for h in hooks] == [ClipUpdate]
    out = apply_update_hooks(hooks, {"w": t(3.0, 4.0)})
    assert update_norm(out) == pytest.approx(1.0, rel=1e-6)

    local = PrivacyConfig(mode="local", noise_multiplier=1.0, clip_norm=1.0, noise_seed=4)
    first = apply_update_hooks(hooks_for(StrategyConfig(), {}, local, seed=1), {"w": t(3.0)})
    again = apply_update_hooks(hooks_for(StrategyConfig(), {}, local, seed=1), {"w": t(3.0)})
    other = apply_update_hooks(hooks_for(StrategyConfig(), {}, local, seed=2), {"w": t(3.0)})
    assert torch.equal(first["w"], again["w"]) and not torch.equal(first["w"], other["w"])
    assert hooks_for(StrategyConfig(), {}, PrivacyConfig()) == []


# --- config -------------------------------------------------------------------------------


def test_privacy_config_defaults_and_a_valid_central_section() -> None:
    config = parse_federation_config(MINIMAL + CENTRAL)
    assert config.privacy.mode == "central" and config.privacy.accountant == "pld"
    assert config.privacy.delta == 1e-5 and config.privacy.budget_delta == 1e-5
    assert parse_federation_config(MINIMAL).privacy.enabled is False
    assert parse_federation_config(MINIMAL + "privacy: {mode: off}\n").privacy.mode == "off"


@pytest.mark.parametrize(
    ("section", "field", "hint"),
    [
        ("{mode: central, noise_multiplier: 0, clip_norm: 1}", "privacy.noise_multiplier", "0"),
        ("{mode: central, noise_multiplier: -1, clip_norm: 1}", "privacy.noise_multiplier", ""),
        ("{mode: central, noise_multiplier: 1, clip_norm: 0}", "privacy.clip_norm", ""),
        ("{mode: local, noise_multiplier: 1, clip_norm: 1, delta: 1}", "privacy.delta", ""),
        ("{mode: local, noise_multiplier: 1, clip_norm: 1, delta: 0}", "privacy.delta", ""),
        (
            "{mode: central, noise_multiplier: 1, clip_norm: 1, accountant: gdp}",
            "privacy.accountant",
            "pld",
        ),
        ("{mode: shuffle, noise_multiplier: 1, clip_norm: 1}", "privacy.mode", ""),
        ("{mode: central, clip_norm: 1}", "privacy", "needs noise_multiplier"),
        ("{mode: central, noise_multiplier: 1}", "privacy", "needs clip_norm"),
        ("{noise_multiplier: 1}", "privacy", "apply to mode: central, local or record"),
        (
            "{mode: central, noise_multiplier: 1, clip_norm: 1, budget: {epsilon: 0}}",
            "privacy.budget.epsilon",
            "",
        ),
        (
            "{mode: central, noise_multiplier: 1, clip_norm: 1, budget: {epsilon: 1, delta: 2}}",
            "privacy.budget.delta",
            "",
        ),
        ("{mode: central, noise_multiplier: 1, clip_norm: 1, sigma: 2}", "privacy.sigma", ""),
    ],
)
def test_bad_privacy_settings_name_the_field(section: str, field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_federation_config(MINIMAL + f"privacy: {section}\n", "fed.yaml")
    assert f"fed.yaml: {field}" in str(caught.value)
    assert hint in str(caught.value)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("strategy: {aggregator: median}\n", "strategy.aggregator: median"),
        ("strategy: {aggregator: trimmed_mean}\n", "strategy.aggregator: trimmed_mean"),
        ("strategy: {name: scaffold}\n", "strategy.name: scaffold"),
        ("strategy: {weighting: examples}\n", "strategy.weighting: examples"),
        ("strategy: {max_site_share: 0.5}\nselection: {min_sites: 2}\n", "max_site_share"),
        ("strategy: {clip: {mode: fixed, bound: 2}}\n", "strategy.clip"),
        ("mode: async\nasync: {buffer_size: 2}\n", "mode: async"),
    ],
)
def test_dp_refuses_settings_that_break_its_sensitivity(extra: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_federation_config(MINIMAL + CENTRAL + extra, "fed.yaml")
    message = str(caught.value)
    assert "privacy.mode: central does not combine with" in message and named in message


def test_dp_accepts_server_optimizers_compression_and_uniform_weighting() -> None:
    for extra in (
        "strategy: {name: fedadam}\n",
        "strategy: {name: fedprox, mu: 0.1, weighting: uniform}\n",
        "compression: {quantize_bits: 8}\n",
    ):
        assert parse_federation_config(MINIMAL + CENTRAL + extra).privacy.enabled
