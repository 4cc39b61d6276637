"""FedAvg: the example-weighted mean of site updates.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. The mean is streamed: each update is folded into one float64
running sum and dropped, so memory does not grow with the number of sites.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .serialization import Weights
from .strategy import Strategy


class WeightedMean:
    """Streaming example-weighted mean of tensors, accumulated in float64."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: int) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if not self._sums:
            self._sums = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in tensors.items()}
        elif tensors.keys() != self._sums.keys():
            raise ValueError("all tensors added to a WeightedMean must have the same keys")
        for name, tensor in tensors.items():
            self._sums[name].add_(tensor.detach().to(torch.float64), alpha=weight)
        self.total_weight += weight

    def mean(self) -> dict[str, torch.Tensor]:
        """The float64 mean; raises if nothing was added."""
        if self.total_weight == 0:
            raise ValueError("no updates were added")
        return {name: total / self.total_weight for name, total in self._sums.items()}


class FedAvg(Strategy):
    """New global = global + Σ nₖ·Δₖ / Σ nₖ over the round's valid updates."""

    name = "fedavg"

    def __init__(self) -> None:
        self._global: dict[str, torch.Tensor] = {}
        self._mean = WeightedMean()

    def begin_round(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        self._global = dict(global_weights)
        self._mean = WeightedMean()

    def accumulate(self, update: Mapping[str, torch.Tensor], num_examples: int) -> None:
        self._mean.add(update, num_examples)

    def finish(self) -> Weights:
        mean_delta = self._mean.mean()
        return {
            name: (base.to(torch.float64) + mean_delta[name]).to(base.dtype)
            for name, base in self._global.items()
        }


def fedavg(
    global_weights: Mapping[str, torch.Tensor],
    updates: Iterable[tuple[Mapping[str, torch.Tensor], int]],
) -> Weights:
    """Batch form of :class:`FedAvg`: one call over all ``(delta, num_examples)`` pairs."""
    strategy = FedAvg()
    strategy.begin_round(global_weights)
    for delta, num_examples in updates:
        strategy.accumulate(delta, num_examples)
    return strategy.finish()
