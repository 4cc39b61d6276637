"""FedAvg (McMahan et al. 2017): exact on integer-valued weights, weighted by examples,
streaming = batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedround.tasks.core.strategies import (
    AggregationError,
    FedAvg,
    NormClipping,
    ServerStrategy,
    WeightedMean,
    build_strategy,
    fedavg,
)


def _w(**arrays: list[float]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}


def test_fedavg_is_exact_on_integer_valued_weights() -> None:
    # Prepare: global 10, two sites with deltas +2 (1 example) and -4 (1 example).
    global_weights = _w(w=[10.0, 10.0], b=[0.0])
    updates = [(_w(w=[2.0, 6.0], b=[4.0]), 1), (_w(w=[-4.0, 0.0], b=[-2.0]), 1)]
    # Execute
    result = fedavg(global_weights, updates)
    # Assert: 10 + (2 - 4) / 2 = 9 and 10 + 6 / 2 = 13; b = (4 - 2) / 2 = 1
    assert torch.equal(result["w"], torch.tensor([9.0, 13.0]))
    assert torch.equal(result["b"], torch.tensor([1.0]))
    assert result["w"].dtype == torch.float32


def test_fedavg_weights_by_example_count() -> None:
    global_weights = _w(w=[0.0])
    # 3 examples at +4, 1 example at -8: (12 - 8) / 4 = 1
    result = fedavg(global_weights, [(_w(w=[4.0]), 3), (_w(w=[-8.0]), 1)])
    assert torch.equal(result["w"], torch.tensor([1.0]))


def test_single_site_fedavg_applies_its_delta() -> None:
    result = fedavg(_w(w=[1.0, 2.0]), [(_w(w=[0.5, -1.0]), 7)])
    assert torch.equal(result["w"], torch.tensor([1.5, 1.0]))


def test_weighted_mean_rejects_bad_input() -> None:
    mean = WeightedMean()
    with pytest.raises(AggregationError, match="no updates"):
        mean.mean()
    with pytest.raises(ValueError, match="positive"):
        mean.add(_w(w=[1.0]), 0)
    mean.add(_w(w=[1.0]), 1)
    with pytest.raises(ValueError, match="same keys"):
        mean.add(_w(v=[1.0]), 1)


sizes = st.integers(min_value=1, max_value=500)
site_updates = st.lists(
    st.tuples(st.lists(st.floats(-100, 100, allow_nan=False), min_size=4, max_size=4), sizes),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(site_updates, st.randoms(use_true_random=False))
def test_streaming_equals_batch_in_any_order(updates: list, rng) -> None:
    global_weights = _w(w=[1.0, -2.0, 3.0, 0.5])
    # Batch reference, computed independently: stack everything and take one weighted mean.
    deltas = np.array([u for u, _ in updates], dtype=np.float64)
    counts = np.array([n for _, n in updates], dtype=np.float64)
    reference = (
        np.array([1.0, -2.0, 3.0, 0.5]) + (deltas * counts[:, None]).sum(0) / counts.sum()
    ).astype(np.float32)
    shuffled = list(updates)
    rng.shuffle(shuffled)
    strategy = ServerStrategy(FedAvg(), clipping=NormClipping("off"))
    strategy.begin_round(global_weights)
    for delta, n in shuffled:
        strategy.accumulate(_w(w=delta), n)
    streamed = strategy.finish()["w"].numpy()
    np.testing.assert_allclose(streamed, reference, rtol=1e-6, atol=1e-5)


def test_fedavg_keeps_one_running_sum_whatever_the_number_of_sites() -> None:
    strategy = ServerStrategy(FedAvg(), clipping=NormClipping("off"))
    strategy.begin_round(_w(w=[0.0] * 1000))
    for i in range(200):
        strategy.accumulate(_w(w=[float(i % 3)] * 1000), 1)
    # The running state is one float64 tensor per weight, however many sites were added.
    assert isinstance(strategy.aggregator, WeightedMean)
    assert not strategy._buffer
    sums = strategy.aggregator._sums
    assert list(sums) == ["w"]
    assert sums["w"].dtype == torch.float64
    assert sums["w"].numel() == 1000


def test_default_fedavg_previews_then_streams_in_o_model_memory() -> None:
    # Default clipping needs the round's median norm: a preview pass keeps one norm and
    # one count per update, the fold keeps one running sum; no update is held.
    strategy = build_strategy("fedavg")
    strategy.begin_round(_w(w=[0.0] * 1000))
    updates = [(_w(w=[float(i % 3 + 1)] * 1000), 1 + i % 4) for i in range(200)]
    for delta, n in updates:
        strategy.preview(delta, n)
    for delta, n in updates:
        strategy.accumulate(delta, n)
    assert not strategy._buffer
    assert list(strategy.aggregator._sums) == ["w"]
    assert torch.equal(strategy.finish()["w"], fedavg(_w(w=[0.0] * 1000), updates)["w"])
