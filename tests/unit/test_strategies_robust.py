"""Robust aggregation: coordinate-wise median and trimmed mean (Yin et al., ICML 2018),
Krum and Multi-Krum (Blanchard et al., NeurIPS 2017), and server-side norm clipping;
hand-computed examples and independent NumPy/SciPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedround.tasks.core.config import StrategyConfig
from fedround.tasks.core.strategies import (
    AggregationError,
    CoordinateMedian,
    FedAvg,
    Krum,
    MultiKrum,
    NormClipping,
    ServerStrategy,
    TrimmedMean,
    Weighting,
    build_strategy,
    update_norm,
)


def _updates(*rows: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(row, dtype=torch.float32)} for row in rows]


def _robust(aggregator, rows, counts=None, clipping=None) -> ServerStrategy:
    strategy = ServerStrategy(FedAvg(), aggregator, clipping or NormClipping("off"))
    strategy.begin_round({"w": torch.zeros(len(rows[0]))})
    for update, n in zip(_updates(*rows), counts or [1] * len(rows), strict=True):
        strategy.accumulate(update, n)
    strategy.result = strategy.finish()  # type: ignore[attr-defined]
    return strategy


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    # Prepare: four sites, one of them wildly off on both coordinates
    rows = [[1.0, 10.0], [3.0, 20.0], [2.0, -1000.0], [1000.0, 30.0]]
    # Execute
    result = _robust(CoordinateMedian(), rows, counts=[1, 1, 1, 500]).result
    # Assert: sorted w₀ = 1, 2, 3, 1000 → 2.5; w₁ = −1000, 10, 20, 30 → 15 (counts ignored)
    assert result["w"].tolist() == [2.5, 15.0]


def test_median_of_an_odd_count_is_the_middle_value() -> None:
    result = _robust(CoordinateMedian(), [[5.0], [-7.0], [1.0]]).result
    assert result["w"].tolist() == [1.0]


def test_trimmed_mean_drops_beta_n_at_each_end() -> None:
    # Prepare: β = 0.25 of 4 updates: ⌊0.25·4⌋ = 1 dropped at each end, per coordinate
    rows = [[1.0, 4.0], [2.0, 8.0], [3.0, -100.0], [100.0, 6.0]]
    # Execute
    result = _robust(TrimmedMean(0.25), rows).result
    # Assert: w₀ keeps 2, 3 → 2.5; w₁ keeps 4, 6 → 5
    assert result["w"].tolist() == [2.5, 5.0]


def test_trimmed_mean_with_beta_zero_is_the_plain_mean() -> None:
    result = _robust(TrimmedMean(0.0), [[1.0], [2.0], [6.0]], counts=[9, 1, 1]).result
    assert result["w"].tolist() == [3.0]  # unweighted by definition


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    # Prepare: 1-D updates 0, 1, 2, 10, 11 with f = 1: each scores its n − f − 2 = 2 nearest.
    rows = [[0.0], [1.0], [2.0], [10.0], [11.0]]
    # Execute
    strategy = _robust(Krum(f=1), rows)
    # Assert: scores 1+4=5, 1+1=2, 1+4=5, 64+1=65, 81+1=82 (squared distances): Krum → 1
    assert strategy.report.selected == [1]
    assert strategy.result["w"].tolist() == [1.0]


def test_multi_krum_averages_the_m_best_weighted_by_examples() -> None:
    rows = [[0.0], [1.0], [2.0], [10.0], [11.0]]
    # m = 3 → updates 1 (score 2), then 0 and 2 (5 each); weights 1, 2, 1 examples
    strategy = _robust(MultiKrum(f=1, m=3), rows, counts=[1, 2, 1, 50, 50])
    assert strategy.report.selected == [0, 1, 2]
    assert strategy.result["w"].tolist() == [1.0]  # (0·1 + 1·2 + 2·1) / 4
    uneven = _robust(MultiKrum(f=1, m=3), rows, counts=[3, 1, 1, 50, 50])
    assert uneven.result["w"].item() == pytest.approx(0.6)  # (0·3 + 1 + 2) / 5


def test_multi_krum_defaults_to_n_minus_f() -> None:
    strategy = _robust(MultiKrum(f=1), [[0.0], [1.0], [2.0], [10.0], [11.0]])
    assert strategy.report.selected == [0, 1, 2, 3]  # drops 11, the worst score


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    with pytest.raises(AggregationError, match=r"more than 2·f \+ 2 = 4 valid updates, got 4"):
        _robust(Krum(f=1), [[0.0], [1.0], [2.0], [3.0]])
    with pytest.raises(AggregationError, match="more than n − f"):
        _robust(MultiKrum(f=1, m=5), [[0.0], [1.0], [2.0], [3.0], [4.0]])


def test_median_clipping_cuts_a_boosted_update_to_the_bound() -> None:
    # Prepare: norms 3, 4, 5 and one boosted update of norm 100; median = 4.5, B = 22.5
    rows = [[3.0, 0.0], [0.0, 4.0], [3.0, 4.0], [60.0, 80.0]]
    updates = [(u, 1) for u in _updates(*rows)]
    strategy = build_strategy("fedavg")
    strategy.begin_round({"w": torch.zeros(2)})
    for update, n in updates:
        strategy.preview(update, n)
    for update, n in updates:
        strategy.accumulate(update, n)
    result = strategy.finish()
    # Assert: the boosted one is scaled by 22.5 / 100 to (13.5, 18)
    assert strategy.report.median_norm == 4.5
    assert strategy.report.clip_bound == 22.5
    assert strategy.report.scales == [1.0, 1.0, 1.0, 0.225]
    assert result["w"].tolist() == pytest.approx([(3 + 0 + 3 + 13.5) / 4, (4 + 4 + 18) / 4])


def test_fixed_clipping_streams_without_a_preview() -> None:
    strategy = ServerStrategy(FedAvg(), clipping=NormClipping("fixed", bound=2.5))
    assert not strategy.needs_preview
    strategy.begin_round({"w": torch.zeros(2)})
    strategy.accumulate({"w": torch.tensor([3.0, 4.0])}, 1)  # norm 5 → × 0.5
    strategy.accumulate({"w": torch.tensor([1.0, 0.0])}, 1)
    assert strategy.finish()["w"].tolist() == [1.25, 1.0]


def test_clipping_applies_before_a_robust_aggregator() -> None:
    strategy = _robust(
        CoordinateMedian(), [[1.0], [2.0], [30.0]], clipping=NormClipping("fixed", bound=1.5)
    )
    assert strategy.report.scales == [1.0, 0.75, 0.05]
    assert strategy.result["w"].tolist() == [1.5]  # median of 1, 1.5, 1.5


def test_update_norm_ignores_integer_buffers() -> None:
    update = {"w": torch.tensor([3.0, 4.0]), "count": torch.tensor(1000)}
    assert update_norm(update) == 5.0


def test_robust_aggregators_are_built_from_config_and_bounded() -> None:
    strategy = build_strategy(
        StrategyConfig(aggregator="trimmed_mean", trim_beta=0.2, max_buffered_updates=2)
    )
    assert not strategy.needs_preview  # it holds the round anyway
    strategy.begin_round({"w": torch.zeros(1)})
    strategy.accumulate({"w": torch.ones(1)}, 1)
    strategy.accumulate({"w": torch.ones(1)}, 1)
    with pytest.raises(AggregationError, match=r"strategy\.max_buffered_updates"):
        strategy.accumulate({"w": torch.ones(1)}, 1)


rows_strategy = st.integers(1, 9).flatmap(
    lambda n: st.lists(
        st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=3, max_size=3),
        min_size=n,
        max_size=n,
    )
)


@settings(max_examples=100, deadline=None)
@given(rows_strategy, st.floats(0.0, 0.49))
def test_median_and_trimmed_mean_equal_numpy_and_scipy(rows, beta) -> None:
    data = np.array(rows, dtype=np.float32).astype(np.float64)
    median = _robust(CoordinateMedian(), rows).result["w"].numpy()
    trimmed = _robust(TrimmedMean(beta), rows).result["w"].numpy()
    np.testing.assert_allclose(median, np.median(data, axis=0).astype(np.float32), rtol=1e-6)
    expected = stats.trim_mean(data, beta, axis=0).astype(np.float32)
    np.testing.assert_allclose(trimmed, expected, rtol=1e-5, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(5, 9).flatmap(
        lambda n: st.lists(
            st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=2),
            min_size=n,
            max_size=n,
        )
    )
)
def test_krum_equals_a_brute_force_reference(rows) -> None:
    data = np.array(rows, dtype=np.float32).astype(np.float64)
    n, f = len(rows), 1
    scores = []
    for i in range(n):
        distances = sorted(((data[i] - data[j]) ** 2).sum() for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    best = min(range(n), key=lambda i: (scores[i], i))
    strategy = _robust(Krum(f=f), rows)
    chosen = strategy.report.selected[0]
    assert scores[chosen] == pytest.approx(scores[best], rel=1e-9, abs=1e-9)
    assert strategy.result["w"].tolist() == pytest.approx(data[chosen].tolist())


def test_uniform_weighting_ignores_example_counts() -> None:
    strategy = ServerStrategy(FedAvg(), weighting=Weighting("uniform"))
    strategy.begin_round({"w": torch.zeros(1)})
    strategy.accumulate({"w": torch.tensor([4.0])}, 1)
    strategy.accumulate({"w": torch.tensor([0.0])}, 99)
    assert strategy.finish()["w"].tolist() == [2.0]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=3, max_size=3),
            st.sampled_from([1.0, 1.0, 1.0, 50.0]),  # some updates boosted 50×
            st.integers(1, 200),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_median_clipping_two_passes_equal_a_numpy_batch_reference(updates) -> None:
    rows = [np.array(u, dtype=np.float32) * np.float32(boost) for u, boost, _ in updates]
    counts = np.array([n for _, _, n in updates], dtype=np.float64)
    # Batch reference: norms, bound = 5 × median norm, clip, example-weighted mean.
    data = np.array(rows, dtype=np.float64)
    norms = np.sqrt((data**2).sum(axis=1))
    bound = 5 * np.median(norms)
    scales = np.where(norms > bound, bound / np.where(norms > 0, norms, 1), 1.0)
    expected = ((data * scales[:, None]) * counts[:, None]).sum(0) / counts.sum()
    # Streaming: the default strategy, previewed then folded.
    strategy = build_strategy("fedavg")
    strategy.begin_round({"w": torch.zeros(3, dtype=torch.float64)})
    tensors = [({"w": torch.from_numpy(row)}, int(n)) for row, n in zip(rows, counts, strict=True)]
    for update, n in tensors:
        strategy.preview(update, n)
    for update, n in tensors:
        strategy.accumulate(update, n)
    result = strategy.finish()["w"].numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)
    assert strategy.report.scales == pytest.approx(list(scales), rel=1e-12)
