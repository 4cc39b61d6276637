"""FedAdagrad, FedYogi and FedAdam: adaptive optimizers at the server.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar and McMahan, "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2. With Δₜ the round's aggregate delta:

    mₜ = β₁·mₜ₋₁ + (1 − β₁)·Δₜ
    vₜ = vₜ₋₁ + Δₜ²                                  FedAdagrad
    vₜ = vₜ₋₁ − (1 − β₂)·Δₜ²·sign(vₜ₋₁ − Δₜ²)         FedYogi
    vₜ = β₂·vₜ₋₁ + (1 − β₂)·Δₜ²                      FedAdam
    xₜ₊₁ = xₜ + η·mₜ / (√vₜ + τ)

as in the paper: m₋₁ = 0, v₋₁ = τ² (the paper asks v₋₁ ≥ τ²), no bias correction; τ
sets the degree of adaptivity (smaller: more adaptive).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from ..serialization import Weights
from .base import ServerOptimizer, Tensors


class AdaptiveOptimizer(ServerOptimizer):
    """The shared step of Algorithm 2; subclasses give the second-moment rule.

    State: the first and second moments, two float64 tensors per floating-point weight
    (O(model)), and the number of steps taken; checkpointed so a resumed run takes the
    same steps, bit for bit.
    """

    def __init__(
        self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{label} must be in [0, 1), got {beta}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.steps = 0
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}

    @abstractmethod
    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """vₜ from vₜ₋₁ and Δₜ² (may update ``v`` in place)."""

    def step(self, global_weights: Tensors, delta: Tensors) -> Weights:
        new: Weights = {}
        for name, base in global_weights.items():
            d = delta[name].to(torch.float64)
            if not base.is_floating_point():
                new[name] = (base.to(torch.float64) + d).to(base.dtype)
                continue
            m = self._m.get(name)
            v = self._v.get(name)
            if m is None or v is None:
                m = torch.zeros_like(d)
                v = torch.full_like(d, self.tau**2)
            m = m.mul_(self.beta1).add_(d, alpha=1 - self.beta1)
            v = self.second_moment(v, d * d)
            self._m[name], self._v[name] = m, v
            step = m / (v.sqrt() + self.tau)
            new[name] = (base.to(torch.float64) + self.server_lr * step).to(base.dtype)
        self.steps += 1
        return new

    def state_dict(self) -> dict[str, Any]:
        if not self.steps:
            return {}
        return {
            "steps": self.steps,
            "m": {name: t.clone() for name, t in self._m.items()},
            "v": {name: t.clone() for name, t in self._v.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"steps", "m", "v"})
        if unknown:
            raise ValueError(f"{self.name} state has unknown keys {unknown}")
        self.steps = int(state.get("steps", 0))
        self._m = {n: t.to(torch.float64).clone() for n, t in state.get("m", {}).items()}
        self._v = {n: t.to(torch.float64).clone() for n, t in state.get("v", {}).items()}
        if self._m.keys() != self._v.keys():
            raise ValueError(f"{self.name} state: first and second moments name other tensors")


class FedAdagrad(AdaptiveOptimizer):
    """vₜ = vₜ₋₁ + Δₜ² (β₂ is not used)."""

    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return v.add_(squared)


class FedYogi(AdaptiveOptimizer):
    """vₜ = vₜ₋₁ − (1 − β₂)·Δₜ²·sign(vₜ₋₁ − Δₜ²): v grows no faster than Δ² asks."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        sign = torch.sign(v - squared)
        return v.sub_(squared.mul_(sign), alpha=1 - self.beta2)


class FedAdam(AdaptiveOptimizer):
    """vₜ = β₂·vₜ₋₁ + (1 − β₂)·Δₜ²."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return v.mul_(self.beta2).add_(squared, alpha=1 - self.beta2)
