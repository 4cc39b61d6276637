"""Client drift at the server: FedAvg (with a server learning rate), FedProx, FedAvgM.

Hand-computed golden values, an independent NumPy batch reference for streaming, and the
default clipping leaving FedAvg's result bit for bit as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedround.tasks.core.config import StrategyConfig
from fedround.tasks.core.strategies import (
    FedAvg,
    FedAvgM,
    ServerStrategy,
    build_strategy,
    fedavg,
)


def _w(**arrays: list[float]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}


def _round(strategy: ServerStrategy, global_weights, updates) -> dict[str, torch.Tensor]:
    strategy.begin_round(global_weights)
    if strategy.needs_preview:
        for delta, n in updates:
            strategy.preview(delta, n)
    for delta, n in updates:
        strategy.accumulate(delta, n)
    return strategy.finish()


def test_fedavg_server_learning_rate_scales_the_mean_update() -> None:
    # Prepare: global 1; updates +4 (1 example) and 0 (3 examples): mean delta 1
    strategy = build_strategy(StrategyConfig(server_lr=0.5))
    # Execute
    result = _round(strategy, _w(w=[1.0]), [(_w(w=[4.0]), 1), (_w(w=[0.0]), 3)])
    # Assert: 1 + 0.5 · (1·4 + 3·0) / 4 = 1.5
    assert result["w"].item() == 1.5


def test_fedprox_aggregates_as_fedavg_at_the_server() -> None:
    strategy = build_strategy(StrategyConfig(name="fedprox", mu=0.1))
    result = _round(strategy, _w(w=[1.0]), [(_w(w=[4.0]), 1), (_w(w=[0.0]), 3)])
    assert strategy.name == "fedprox"
    assert result["w"].item() == 2.0  # 1 + (4 + 0) / 4


def test_fedavgm_hand_computed_two_rounds() -> None:
    # Prepare: β = 0.5, η = 1; mean update +1 in round 1 and +1 in round 2.
    strategy = build_strategy(StrategyConfig(name="fedavgm", momentum=0.5))
    # Execute
    first = _round(strategy, _w(w=[0.0]), [(_w(w=[1.0]), 2)])
    second = _round(strategy, first, [(_w(w=[2.0]), 1), (_w(w=[0.0]), 1)])
    # Assert: v₀ = 1, x₁ = 1; v₁ = 0.5·1 + 1 = 1.5, x₂ = 1 + 1.5 = 2.5
    assert first["w"].item() == 1.0
    assert second["w"].item() == 2.5
    assert strategy.state_dict()["velocity"]["w"].item() == 1.5


def test_fedavgm_with_zero_momentum_is_fedavg() -> None:
    updates = [(_w(w=[0.25, -3.0]), 3), (_w(w=[1.5, 0.5]), 5)]
    plain = fedavg(_w(w=[1.0, 2.0]), updates)
    strategy = ServerStrategy(FedAvgM(server_lr=1.0, momentum=0.0))
    assert torch.equal(_round(strategy, _w(w=[1.0, 2.0]), updates)["w"], plain["w"])


def test_integer_buffers_take_the_plain_mean_delta() -> None:
    # A BatchNorm batch counter is not a weight: no momentum, no learning rate.
    strategy = ServerStrategy(FedAvgM(server_lr=0.5, momentum=0.9))
    global_weights = {"w": torch.tensor([0.0]), "count": torch.tensor(10)}
    update = {"w": torch.tensor([2.0]), "count": torch.tensor(4)}
    result = _round(strategy, global_weights, [(update, 1)])
    assert result["count"].item() == 14 and result["count"].dtype == torch.int64
    assert result["w"].item() == 1.0


def test_default_clipping_leaves_honest_fedavg_bit_for_bit() -> None:
    # Prepare: updates whose norms are within 5× the round's median
    rng = np.random.default_rng(7)
    global_weights = {"w": torch.from_numpy(rng.normal(size=(8, 3)).astype(np.float32))}
    updates = [
        ({"w": torch.from_numpy(rng.normal(scale=s, size=(8, 3)).astype(np.float32))}, n)
        for s, n in ((0.1, 37), (0.3, 120), (0.2, 5), (0.45, 64))
    ]
    # Execute
    default = build_strategy("fedavg")
    result = _round(default, global_weights, updates)
    # Assert: the same bytes as plain FedAvg, and the clipping bound was computed
    assert default.needs_preview
    assert torch.equal(result["w"], fedavg(global_weights, updates)["w"])
    assert default.report.clip_bound == pytest.approx(5 * default.report.median_norm)
    assert default.report.scales == [1.0] * 4


sizes = st.integers(min_value=1, max_value=500)
rounds_of_updates = st.lists(
    st.lists(
        st.tuples(st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3), sizes),
        min_size=1,
        max_size=6,
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=100, deadline=None)
@given(rounds_of_updates, st.floats(0.0, 0.99), st.floats(0.1, 2.0))
def test_fedavgm_streaming_equals_a_numpy_batch_reference(rounds, beta, lr) -> None:
    x = np.array([1.0, -2.0, 0.5])
    velocity = np.zeros(3)
    strategy = ServerStrategy(FedAvgM(server_lr=lr, momentum=beta))
    weights = {"w": torch.tensor(x, dtype=torch.float64)}
    for updates in rounds:
        # Batch reference: the whole round at once.
        deltas = np.array([u for u, _ in updates])
        counts = np.array([n for _, n in updates], dtype=np.float64)
        mean = (deltas * counts[:, None]).sum(0) / counts.sum()
        velocity = beta * velocity + mean
        x = x + lr * velocity
        weights = _round(
            strategy,
            weights,
            [({"w": torch.tensor(u, dtype=torch.float64)}, n) for u, n in updates],
        )
        np.testing.assert_allclose(weights["w"].numpy(), x, rtol=1e-10, atol=1e-10)


def test_server_learning_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        FedAvg(server_lr=0.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        FedAvgM(momentum=1.0)
