"""Update weights: example-weighted or uniform, with each site's share of a round capped
(water-filling, as DP-FedAvg's bounded per-user weights)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedround.tasks.core.strategies import (
    FedAvg,
    NormClipping,
    ServerStrategy,
    Weighting,
    capped_weights,
)


@pytest.mark.security("self-reported-weight")
def test_one_dominant_site_is_cut_to_the_cap() -> None:
    # Prepare: 1,000 vs 10, 10, 10 examples; cap 0.4
    # Execute
    weights = capped_weights([1000, 10, 10, 10], 0.4)
    # Assert: c = 0.4·(c + 30) → c = 20; shares 20/50 = 0.4 and 10/50 = 0.2 each
    assert weights == pytest.approx([20.0, 10.0, 10.0, 10.0])


def test_two_large_sites_share_the_level() -> None:
    # 500, 400, 50, 50 with cap 0.3: capping 500 alone gives c = 0.3·(c + 500)/… → 214.3,
    # below 400, so both are cut: c = 0.3·(2c + 100) → c = 75; shares 75/250 = 0.3
    weights = capped_weights([500, 400, 50, 50], 0.3)
    assert weights == pytest.approx([75.0, 75.0, 50.0, 50.0])


def test_weights_within_the_cap_are_returned_unchanged() -> None:
    weights = capped_weights([30, 20, 25, 25], 0.3)
    assert weights == [30, 20, 25, 25]
    assert all(isinstance(w, int) for w in weights)  # FedAvg's exact integer path


def test_a_cap_that_cannot_hold_gives_uniform_weights() -> None:
    # Two updates cannot each be ≤ 0.4 of the total: the nearest is 0.5 each.
    assert capped_weights([90, 10], 0.4) == [1.0, 1.0]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 10_000), min_size=1, max_size=20),
    st.floats(0.05, 1.0),
)
def test_capped_weights_properties(counts, share) -> None:
    weights = capped_weights(counts, share)
    total = sum(weights)
    if len(counts) * share >= 1 - 1e-9:
        # No share above the cap; sites under the cap keep their count; order is kept.
        assert max(weights) / total <= share * (1 + 1e-9)
        assert all(w == c for w, c in zip(weights, counts, strict=True) if w < max(weights))
        assert all(
            (a <= b) == (wa <= wb) or wa == wb
            for a, wa in zip(counts, weights, strict=True)
            for b, wb in zip(counts, weights, strict=True)
        )
        # The cap only cuts where it must: the largest weight is at the cap or uncut.
        assert max(weights) == max(counts) or max(weights) / total == pytest.approx(share)
    else:
        assert weights == [1.0] * len(counts)


def test_capped_strategy_previews_then_folds_with_the_capped_weights() -> None:
    strategy = ServerStrategy(
        FedAvg(), clipping=NormClipping("off"), weighting=Weighting("examples", 0.4)
    )
    updates = [({"w": torch.tensor([x])}, n) for x, n in ((5.0, 1000), (0.0, 10), (0.0, 10))]
    assert strategy.needs_preview
    strategy.begin_round({"w": torch.zeros(1)})
    for update, n in [*updates, (updates[0][0], 10)]:
        strategy.preview(update, n)
    for update, n in [*updates, (updates[0][0], 10)]:
        strategy.accumulate(update, n)
    # weights 20, 10, 10, 10 → (5·20 + 5·10) / 50 = 3
    assert strategy.finish()["w"].item() == pytest.approx(3.0)
    assert strategy.report.shares == pytest.approx([0.4, 0.2, 0.2, 0.2])


def test_accumulate_must_follow_the_preview() -> None:
    strategy = ServerStrategy(FedAvg(), weighting=Weighting("examples", 0.5))
    strategy.begin_round({"w": torch.zeros(1)})
    strategy.preview({"w": torch.ones(1)}, 3)
    strategy.preview({"w": torch.ones(1)}, 4)
    with pytest.raises(RuntimeError, match="same order"):
        strategy.accumulate({"w": torch.ones(1)}, 4)


def test_bad_weighting_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"max_site_share must be in \(0, 1\]"):
        Weighting("examples", 0.0)
    with pytest.raises(ValueError, match="'examples' or 'uniform'"):
        Weighting("sizes")  # type: ignore[arg-type]
