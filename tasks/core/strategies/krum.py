"""Krum and Multi-Krum: keep the updates closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017. With n updates of which at most f are
Byzantine, each update i scores s(i) = Σ ‖Δᵢ − Δⱼ‖² over its n − f − 2 nearest other
updates; Krum keeps the update with the lowest score, Multi-Krum averages the m lowest.
Both need n > 2f + 2 (the config check refuses a quorum that could not provide it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..serialization import Weights
from .base import AggregationError, Aggregator, Tensors, check_same_keys, to_float64
from .mean import WeightedMean
from .weighting import Weighting


def squared_distances(updates: Sequence[Tensors]) -> torch.Tensor:
    """The n × n matrix of squared L2 distances between updates (float64), tensor by
    tensor so that only one tensor's n copies are stacked at a time."""
    n = len(updates)
    distances = torch.zeros((n, n), dtype=torch.float64)
    for name in check_same_keys(updates):
        stacked = torch.stack([u[name].detach().to(torch.float64).reshape(-1) for u in updates])
        for i in range(n - 1):
            diff = stacked[i + 1 :] - stacked[i]
            distances[i, i + 1 :] += (diff * diff).sum(dim=1)
    return distances + distances.T


def krum_scores(updates: Sequence[Tensors], f: int) -> list[float]:
    """s(i): the sum of squared distances from update i to its n − f − 2 nearest others."""
    n = len(updates)
    if n <= 2 * f + 2:
        raise AggregationError(
            f"Krum with f={f} needs more than 2·f + 2 = {2 * f + 2} valid updates, got {n}"
        )
    distances = squared_distances(updates)
    neighbours = n - f - 2
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(float(torch.sort(others, stable=True).values[:neighbours].sum()))
    return scores


class MultiKrum(Aggregator):
    """Average of the m updates with the lowest Krum scores (ties: the earlier update in
    site order), weighted as the strategy weights (example counts or uniform, capped).

    Memory: O(n × model): the round's n updates are held together (the strategy buffers
    them, up to ``strategy.max_buffered_updates``), plus n copies of the largest tensor
    and an n × n distance matrix while distances are computed.
    """

    name = "multi_krum"
    memory = "O(n × model)"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        if f < 0:
            raise ValueError(f"krum_f must be >= 0, got {f}")
        if m is not None and m < 1:
            raise ValueError(f"multi_krum_m must be >= 1, got {m}")
        self.f = f
        self.m = m
        self._selected: list[int] | None = None

    @property
    def selected(self) -> list[int] | None:
        return self._selected

    def how_many(self, n: int) -> int:
        """m, or n − f when not configured (the honest updates, at most)."""
        m = self.m if self.m is not None else n - self.f
        if m > n - self.f:
            raise AggregationError(
                f"Multi-Krum averages m={m} updates, more than n − f = {n - self.f} "
                f"of the {n} valid ones"
            )
        return m

    def aggregate(
        self, updates: Sequence[Tensors], counts: Sequence[int], weighting: Weighting
    ) -> Weights:
        scores = krum_scores(updates, self.f)
        m = self.how_many(len(updates))
        ranked = sorted(range(len(updates)), key=lambda i: (scores[i], i))
        self._selected = sorted(ranked[:m])
        weights = weighting.weights([counts[i] for i in self._selected])
        mean = WeightedMean()
        for i, weight in zip(self._selected, weights, strict=True):
            mean.add(updates[i], weight)
        return mean.mean()


class Krum(MultiKrum):
    """The single update with the lowest Krum score (Multi-Krum with m = 1)."""

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        super().__init__(f=f, m=1)

    def aggregate(
        self, updates: Sequence[Tensors], counts: Sequence[int], weighting: Weighting
    ) -> Weights:
        del counts, weighting
        scores = krum_scores(updates, self.f)
        best = min(range(len(updates)), key=lambda i: (scores[i], i))
        self._selected = [best]
        return to_float64(updates[best])
