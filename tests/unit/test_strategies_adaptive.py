"""Server optimizers of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021):
FedAdam, FedYogi, FedAdagrad against hand computations of Algorithm 2 and a NumPy
reference over several rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedround.tasks.core.config import StrategyConfig
from fedround.tasks.core.strategies import (
    FedAdagrad,
    FedAdam,
    FedYogi,
    ServerStrategy,
    build_strategy,
)


def _round(strategy: ServerStrategy, x: float, updates: list[tuple[float, int]]) -> float:
    strategy.begin_round({"w": torch.tensor([x], dtype=torch.float64)})
    for delta, n in updates:
        strategy.accumulate({"w": torch.tensor([delta], dtype=torch.float64)}, n)
    return strategy.finish()["w"].item()


HYPER = {"server_lr": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 0.5}


def test_fedadam_two_rounds_by_hand() -> None:
    # Prepare: η = 0.1, β₁ = 0.5, β₂ = 0.75, τ = 0.5, so v₋₁ = τ² = 0.25, m₋₁ = 0.
    strategy = ServerStrategy(FedAdam(**HYPER))
    # Execute: round 1, Δ = 0.5 (updates 1 and 0, one example each); round 2, Δ = 1.5.
    x1 = _round(strategy, 0.0, [(1.0, 1), (0.0, 1)])
    x2 = _round(strategy, x1, [(1.5, 4)])
    # Assert: m₀ = 0.25, v₀ = 0.75·0.25 + 0.25·0.25 = 0.25, x₁ = 0.1·0.25/(0.5 + 0.5)
    assert x1 == pytest.approx(0.025, abs=1e-15)
    # m₁ = 0.5·0.25 + 0.5·1.5 = 0.875, v₁ = 0.75·0.25 + 0.25·2.25 = 0.75
    assert x2 == pytest.approx(0.025 + 0.1 * 0.875 / (math.sqrt(0.75) + 0.5), abs=1e-15)
    state = strategy.state_dict()
    assert state["steps"] == 2
    assert state["m"]["w"].item() == 0.875 and state["v"]["w"].item() == 0.75


def test_fedyogi_two_rounds_by_hand() -> None:
    strategy = ServerStrategy(FedYogi(**HYPER))
    x1 = _round(strategy, 0.0, [(0.5, 3)])
    x2 = _round(strategy, x1, [(1.5, 1)])
    # v₀ = 0.25 − 0.25·0.25·sign(0.25 − 0.25) = 0.25: the same first step as Adam
    assert x1 == pytest.approx(0.025, abs=1e-15)
    # v₁ = 0.25 − 0.25·2.25·sign(0.25 − 2.25) = 0.8125 (Adam: 0.75)
    assert x2 == pytest.approx(0.025 + 0.1 * 0.875 / (math.sqrt(0.8125) + 0.5), abs=1e-15)
    assert strategy.state_dict()["v"]["w"].item() == 0.8125


def test_fedyogi_shrinks_v_when_updates_get_small() -> None:
    strategy = ServerStrategy(FedYogi(server_lr=0.1, beta1=0.0, beta2=0.5, tau=2.0))
    _round(strategy, 0.0, [(0.0, 1)])
    # v₋₁ = 4, Δ² = 0 < v: v₀ = 4 − 0.5·0·(+1) = 4 (Yogi moves v by at most (1−β₂)Δ²)
    assert strategy.state_dict()["v"]["w"].item() == 4.0
    _round(strategy, 0.0, [(1.0, 1)])
    # Δ² = 1 < v = 4: v₁ = 4 − 0.5·1 = 3.5 (Adam would give 0.5·4 + 0.5·1 = 2.5)
    assert strategy.state_dict()["v"]["w"].item() == 3.5


def test_fedadagrad_two_rounds_by_hand() -> None:
    # Prepare: β₁ = 0.5, τ = 0.3 (v₋₁ = 0.09); β₂ does not enter Adagrad.
    strategy = ServerStrategy(FedAdagrad(server_lr=0.1, beta1=0.5, tau=0.3))
    x1 = _round(strategy, 1.0, [(0.4, 2)])
    x2 = _round(strategy, x1, [(1.2, 2)])
    # m₀ = 0.2, v₀ = 0.09 + 0.16 = 0.25, x₁ = 1 + 0.1·0.2/(0.5 + 0.3) = 1.025
    assert x1 == pytest.approx(1.025, abs=1e-15)
    # m₁ = 0.1 + 0.6 = 0.7, v₁ = 0.25 + 1.44 = 1.69, x₂ = 1.025 + 0.1·0.7/(1.3 + 0.3)
    assert x2 == pytest.approx(1.025 + 0.07 / 1.6, abs=1e-14)


def test_adaptive_step_is_per_coordinate() -> None:
    # A coordinate with a 100× larger update moves about as far: Adam normalizes by √v.
    strategy = build_strategy(StrategyConfig(name="fedadam", tau=1e-9, beta1=0.0, beta2=0.0))
    strategy.begin_round({"w": torch.zeros(2)})
    strategy.accumulate({"w": torch.tensor([0.01, 1.0])}, 1)
    step = strategy.finish()["w"]
    assert step.tolist() == pytest.approx([0.01, 0.01], rel=1e-5)  # η = 0.01 by default


def _reference(kind: str, rounds, lr, b1, b2, tau) -> np.ndarray:
    """Algorithm 2 of Reddi et al., over whole rounds, in NumPy."""
    x = np.array([0.5, -1.0])
    m = np.zeros(2)
    v = np.full(2, tau**2)
    for updates in rounds:
        deltas = np.array([u for u, _ in updates])
        counts = np.array([n for _, n in updates], dtype=np.float64)
        d = (deltas * counts[:, None]).sum(0) / counts.sum()
        m = b1 * m + (1 - b1) * d
        if kind == "fedadagrad":
            v = v + d**2
        elif kind == "fedyogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = b2 * v + (1 - b2) * d**2
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


rounds_of_updates = st.lists(
    st.lists(
        st.tuples(
            st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=2),
            st.integers(1, 100),
        ),
        min_size=1,
        max_size=5,
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["fedadam", "fedyogi", "fedadagrad"]),
    rounds_of_updates,
    st.floats(1e-3, 1.0),
    st.floats(0.0, 0.99),
    st.floats(0.0, 0.999),
    st.floats(1e-4, 1.0),
)
def test_streaming_equals_the_numpy_reference(kind, rounds, lr, b1, b2, tau) -> None:
    optimizer = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[kind]
    strategy = ServerStrategy(optimizer(server_lr=lr, beta1=b1, beta2=b2, tau=tau))
    weights = {"w": torch.tensor([0.5, -1.0], dtype=torch.float64)}
    for updates in rounds:
        strategy.begin_round(weights)
        for delta, n in updates:
            strategy.accumulate({"w": torch.tensor(delta, dtype=torch.float64)}, n)
        weights = strategy.finish()
    expected = _reference(kind, rounds, lr, b1, b2, tau)
    np.testing.assert_allclose(weights["w"].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_float32_weights_stay_float32_and_moments_float64() -> None:
    strategy = build_strategy(StrategyConfig(name="fedyogi"))
    strategy.begin_round({"w": torch.zeros(3)})
    strategy.accumulate({"w": torch.ones(3)}, 2)
    assert strategy.finish()["w"].dtype == torch.float32
    state = strategy.state_dict()
    assert state["m"]["w"].dtype == state["v"]["w"].dtype == torch.float64


def test_bad_hyperparameters_are_refused() -> None:
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        FedAdam(server_lr=-1.0)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        FedYogi(beta2=1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        FedAdagrad(tau=0.0)
