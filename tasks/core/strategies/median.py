"""Coordinate-wise median of a round's updates.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018 (Option I, the coordinate-wise median). Each
coordinate of the aggregate is the median of that coordinate over the round's updates
(for an even count, the mean of the two middle values), so fewer than half the sites,
however they lie, cannot drag a coordinate outside the range of the honest ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..serialization import Weights
from .base import Aggregator, Tensors, check_same_keys
from .weighting import Weighting


def sorted_stack(updates: Sequence[Tensors], name: str) -> torch.Tensor:
    """The ``name`` tensors of every update, stacked along a new first axis and sorted
    along it, in float64."""
    stacked = torch.stack([update[name].detach().to(torch.float64) for update in updates])
    return torch.sort(stacked, dim=0, stable=True).values


class CoordinateMedian(Aggregator):
    """The coordinate-wise median; unweighted by definition (example counts and the
    per-site cap do not enter it).

    Memory: O(n × model): the round's n updates are held together (the strategy buffers
    them, up to ``strategy.max_buffered_updates``), plus one float64 stack of n copies of
    the largest tensor while it is sorted.
    """

    name = "median"
    memory = "O(n × model)"

    def aggregate(
        self, updates: Sequence[Tensors], counts: Sequence[int], weighting: Weighting
    ) -> Weights:
        del counts, weighting
        names = check_same_keys(updates)
        n = len(updates)
        result: Weights = {}
        for name in names:
            ordered = sorted_stack(updates, name)
            result[name] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        return result
