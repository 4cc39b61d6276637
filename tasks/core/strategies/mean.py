"""The weighted mean of a round's updates, streamed.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 (FedAvg's aggregate: Σ wₖ·Δₖ / Σ wₖ). Each update is folded into one
float64 running sum and dropped, so memory does not grow with the number of sites.
"""

from __future__ import annotations

import torch

from ..serialization import Weights
from .base import AggregationError, StreamingAggregator, Tensors


class WeightedMean(StreamingAggregator):
    """Streaming weighted mean of tensors, accumulated in float64.

    Memory: one float64 running sum per tensor, O(model), whatever the number of updates.
    """

    name = "mean"

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self.total_weight: float = 0

    def begin(self) -> None:
        self._sums = {}
        self.total_weight = 0

    def add(self, update: Tensors, weight: float, scale: float = 1.0) -> None:
        """Add ``weight × scale × update`` (``scale``, a clipping factor, only touches
        floating-point tensors; integer buffers are averaged as they are)."""
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if not self._sums:
            self._sums = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in update.items()}
        elif update.keys() != self._sums.keys():
            raise ValueError("all tensors added to a WeightedMean must have the same keys")
        scaled = weight if scale == 1.0 else weight * scale
        for name, tensor in update.items():
            alpha = scaled if tensor.is_floating_point() else weight
            self._sums[name].add_(tensor.detach().to(torch.float64), alpha=alpha)
        self.total_weight += weight

    def mean(self) -> Weights:
        """The float64 mean; raises if nothing was added."""
        if self.total_weight == 0:
            raise AggregationError("no updates were added")
        return {name: total / self.total_weight for name, total in self._sums.items()}

    def result(self) -> Weights:
        return self.mean()
