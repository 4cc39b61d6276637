"""FedAvg's server step: the new global model is the old one plus the mean update.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. With a server learning rate η ≠ 1 this is FedOpt with SGD as the
server optimizer (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..serialization import Weights
from .base import ServerOptimizer, Tensors
from .mean import WeightedMean


class FedAvg(ServerOptimizer):
    """xₜ₊₁ = xₜ + η·Δₜ, where Δₜ is the round's aggregate delta (η = 1: plain FedAvg).

    Stateless; memory O(model) for the step itself.
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr

    def step(self, global_weights: Tensors, delta: Tensors) -> Weights:
        new: Weights = {}
        for name, base in global_weights.items():
            step = delta[name]
            if self.server_lr != 1.0 and base.is_floating_point():
                step = step * self.server_lr
            new[name] = (base.to(torch.float64) + step).to(base.dtype)
        return new


def fedavg(
    global_weights: Mapping[str, torch.Tensor],
    updates: Iterable[tuple[Mapping[str, torch.Tensor], int]],
) -> Weights:
    """Plain FedAvg in one call: global + Σ nₖ·Δₖ / Σ nₖ over ``(delta, num_examples)``
    pairs (no clipping, no weight cap): the reference the tests compare runs against."""
    mean = WeightedMean()
    for delta, num_examples in updates:
        mean.add(delta, num_examples)
    return FedAvg().step(global_weights, mean.mean())
