"""Coordinate-wise trimmed mean of a round's updates.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018 (Option II, the coordinate-wise β-trimmed mean).
For each coordinate, the ⌊β·n⌋ largest and ⌊β·n⌋ smallest values are dropped and the rest
averaged; with β < 1/2 at least one value always remains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..serialization import Weights
from .base import Aggregator, Tensors, check_same_keys
from .median import sorted_stack
from .weighting import Weighting


def trimmed_count(beta: float, n: int) -> int:
    """⌊β·n⌋, the number of values dropped at each end (robust to 0.29·100 = 28.999…)."""
    return math.floor(beta * n + 1e-9)


class TrimmedMean(Aggregator):
    """The coordinate-wise β-trimmed mean, 0 ≤ β < 1/2; unweighted by definition.

    Memory: O(n × model): the round's n updates are held together (the strategy buffers
    them, up to ``strategy.max_buffered_updates``), plus one float64 stack of n copies of
    the largest tensor while it is sorted.
    """

    name = "trimmed_mean"
    memory = "O(n × model)"

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"trim_beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(
        self, updates: Sequence[Tensors], counts: Sequence[int], weighting: Weighting
    ) -> Weights:
        del counts, weighting
        names = check_same_keys(updates)
        n = len(updates)
        k = trimmed_count(self.beta, n)
        result: Weights = {}
        for name in names:
            kept = sorted_stack(updates, name)[k : n - k]
            result[name] = kept.sum(dim=0) / (n - 2 * k)
        return result
