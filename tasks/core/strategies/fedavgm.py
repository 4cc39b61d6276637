"""FedAvgM: FedAvg with momentum at the server.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335, 2019. The server keeps a velocity of the mean
updates: vₜ = β·vₜ₋₁ + Δₜ, and steps xₜ₊₁ = xₜ + η·vₜ (the paper writes it with the
negated update, v ← βv + Δw, w ← w − v; it is the same rule). With β = 0 it is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..serialization import Weights
from .base import ServerOptimizer, Tensors


class FedAvgM(ServerOptimizer):
    """Server momentum β and learning rate η over the round's aggregate delta.

    State: the velocity, one float64 tensor per floating-point weight (O(model)),
    checkpointed so that a resumed run continues with the same velocity, bit for bit.
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.server_lr = server_lr
        self.momentum = momentum
        self._velocity: dict[str, torch.Tensor] = {}

    def step(self, global_weights: Tensors, delta: Tensors) -> Weights:
        new: Weights = {}
        for name, base in global_weights.items():
            d = delta[name].to(torch.float64)
            if not base.is_floating_point():
                new[name] = (base.to(torch.float64) + d).to(base.dtype)
                continue
            previous = self._velocity.get(name)  # v₋₁ = 0, so v₀ = Δ₀
            velocity = d.clone() if previous is None else previous.mul_(self.momentum).add_(d)
            self._velocity[name] = velocity
            new[name] = (base.to(torch.float64) + self.server_lr * velocity).to(base.dtype)
        return new

    def state_dict(self) -> dict[str, Any]:
        if not self._velocity:
            return {}
        return {"velocity": {name: t.clone() for name, t in self._velocity.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"velocity"})
        if unknown:
            raise ValueError(f"fedavgm state has unknown keys {unknown}")
        velocity = state.get("velocity", {})
        self._velocity = {n: t.to(torch.float64).clone() for n, t in velocity.items()}
