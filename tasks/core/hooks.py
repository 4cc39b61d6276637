"""Client-side strategy hooks: how a strategy acts inside a site's local training without
the training code (fedround's loop or the user's ``train``) knowing.

A hook sees two seams:

- ``gradient(name, parameter, grad)``: called for every parameter's gradient during each
  backward pass (through ``Tensor.register_hook``), so it works with any loss, optimizer
  and training loop. FedProx adds its proximal term here; SCAFFOLD's control variates
  and per-step clipping fit the same seam.
- ``update(delta)``: called once on the finished update (local − global weights) before it
  is serialized, e.g. for update clipping under differential privacy or compression.

Hooks are built at the site from the round's strategy config and installed around the
training call by :func:`hooks_installed`; they are removed afterwards, whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .config import StrategyConfig
from .serialization import Weights


class ClientHook:
    """Base class: both seams pass through unchanged."""

    def gradient(self, name: str, parameter: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def update(self, delta: Weights) -> Weights:
        return delta


class ProximalTerm(ClientHook):
    """FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous
    Networks", MLSys 2020): the local objective gains (μ/2)·‖w − w_global‖², so every
    gradient gains μ·(w − w_global)."""

    def __init__(self, mu: float, global_weights: Mapping[str, torch.Tensor]) -> None:
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.mu = mu
        self.anchor = {name: t.detach().clone() for name, t in global_weights.items()}

    def gradient(self, name: str, parameter: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        anchor = self.anchor.get(name)
        if anchor is None or not self.mu:
            return grad
        return grad + self.mu * (parameter.detach() - anchor.to(grad.device, grad.dtype))


def hooks_for(
    strategy: StrategyConfig, global_weights: Mapping[str, torch.Tensor]
) -> list[ClientHook]:
    """The client hooks a strategy needs at the site (none for plain FedAvg)."""
    if strategy.name == "fedprox":
        return [ProximalTerm(strategy.mu, global_weights)]
    return []


@contextmanager
def hooks_installed(model: nn.Module, hooks: Sequence[ClientHook]) -> Iterator[None]:
    """Route every parameter gradient of ``model`` through ``hooks`` while the block runs."""
    if not hooks:
        yield
        return
    handles = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue

        def route(
            grad: torch.Tensor, name: str = name, parameter: torch.Tensor = parameter
        ) -> torch.Tensor:
            for hook in hooks:
                grad = hook.gradient(name, parameter, grad)
            return grad

        handles.append(parameter.register_hook(route))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def apply_update_hooks(hooks: Sequence[ClientHook], delta: Weights) -> Weights:
    for hook in hooks:
        delta = hook.update(delta)
    return delta
