"""SCAFFOLD: control variates that correct the sites' client drift.

Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020, Algorithm 1 with option II. The server keeps
a control variate c, each site i its own cᵢ (at the site, across rounds and restarts: see
:mod:`fedround.site_workers.scaffold`). In a round, with global weights x:

    site i:  K local steps   yᵢ ← yᵢ − η_l·(gᵢ(yᵢ) − cᵢ + c)       (the ControlVariate hook)
             cᵢ⁺ = cᵢ − c + (x − yᵢ) / (K·η_l)                      (option II)
             sends Δyᵢ = yᵢ − x and Δcᵢ = cᵢ⁺ − cᵢ
    server:  x ← x + η_g·mean(Δyᵢ)                                   (weighted as configured)
             c ← c + (|S|/N)·mean(Δcᵢ) = c + (1/N)·Σ Δcᵢ             (unweighted, as the paper)

N is the number of sites in the federation (``population``; without one, N = |S|: full
participation). Control variates cover every floating-point tensor of the model; a
tensor that gets no gradient at a site (a buffer, a frozen parameter) has cᵢ⁺ = 0 there.

Transport: the coordinator publishes c beside the round's global model (its digest in the
round spec); a site sends Δcᵢ in its update as extra tensors named ``control/<tensor>``,
which validation accepts in SCAFFOLD runs only. The model part of an update goes through
the configured weighting, clipping and aggregator like any other; a site's Δcᵢ counts
with the clipping factor its model update got, and only if the aggregator used that update
(Krum, Multi-Krum). Memory: one float64 running sum of the Δcᵢ (O(model)) when the
aggregator streams; with a robust aggregator the Δcᵢ are held with the round's updates.

State: c, one float64 tensor per floating-point weight, checkpointed with the global
weights so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..serialization import Weights
from .base import AggregationError, Aggregator, Tensors
from .clipping import NormClipping
from .fedavg import FedAvg
from .server import ServerStrategy
from .weighting import Weighting

CONTROL_PREFIX = "control/"


def control_names(weights: Tensors) -> list[str]:
    """The tensors that carry a control variate: the model's floating-point ones, sorted."""
    return sorted(name for name, tensor in weights.items() if tensor.is_floating_point())


def control_key(name: str) -> str:
    """The name of a tensor's control delta inside an update payload."""
    return CONTROL_PREFIX + name


def split_update(update: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model delta, control deltas by model tensor name) of one SCAFFOLD update."""
    model: dict[str, torch.Tensor] = {}
    control: dict[str, torch.Tensor] = {}
    for name, tensor in update.items():
        if name.startswith(CONTROL_PREFIX):
            control[name.removeprefix(CONTROL_PREFIX)] = tensor
        else:
            model[name] = tensor
    return model, control


def server_control(state: Mapping[str, Any], global_weights: Tensors) -> Weights:
    """The server's c as the sites get it: in each tensor's dtype (zeros before the first
    round has run)."""
    control = state.get("control", {})
    published: Weights = {}
    for name in control_names(global_weights):
        base = global_weights[name]
        value = control.get(name)
        published[name] = (
            torch.zeros_like(base) if value is None else value.to(base.dtype).reshape(base.shape)
        )
    return published


def client_variate(
    variate: Tensors, server: Tensors, delta: Tensors, steps: int, learning_rate: float
) -> Weights:
    """Option II: cᵢ⁺ = cᵢ − c + (x − yᵢ)/(K·η_l) = cᵢ − c − Δyᵢ/(K·η_l), computed in float64
    and returned in each variate's dtype. With no local step (K = 0) the variate stays."""
    if steps <= 0:
        return {name: tensor.clone() for name, tensor in variate.items()}
    if not learning_rate > 0:
        raise ValueError(f"SCAFFOLD needs a local learning rate > 0, got {learning_rate}")
    scale = 1.0 / (steps * learning_rate)
    updated: Weights = {}
    for name, c_i in variate.items():
        value = (
            c_i.to(torch.float64)
            - server[name].to(torch.float64)
            - delta[name].to(torch.float64) * scale
        )
        updated[name] = value.to(c_i.dtype)
    return updated


class ScaffoldStep(FedAvg):
    """SCAFFOLD's model step at the server: x ← x + η_g·mean(Δyᵢ) (FedAvg's, with the
    server learning rate η_g). The control variate lives in :class:`Scaffold`."""

    name = "scaffold"


class Scaffold(ServerStrategy):
    """The server side of SCAFFOLD: the configured weighting, clipping and aggregator over
    the model part of the updates, η_g on the model step, and the server control variate
    c ← c + (1/N)·Σ Δcᵢ over the updates the round used."""

    def __init__(
        self,
        server_lr: float = 1.0,
        aggregator: Aggregator | None = None,
        clipping: NormClipping | None = None,
        weighting: Weighting | None = None,
        max_buffered_updates: int = 1000,
        population: int | None = None,
    ) -> None:
        super().__init__(
            ScaffoldStep(server_lr), aggregator, clipping, weighting, max_buffered_updates
        )
        if population is not None and population < 1:
            raise ValueError(f"population must be >= 1 site, got {population}")
        self.population = population
        self.control: dict[str, torch.Tensor] = {}  # c, float64; empty: c = 0
        self._names: list[str] = []
        self._sum: dict[str, torch.Tensor] = {}  # Σ scale·Δcᵢ over folded updates
        self._summed = 0
        self._held: list[dict[str, torch.Tensor]] = []  # Δcᵢ of updates held by the round

    def begin_round(self, global_weights: Tensors) -> None:
        super().begin_round(global_weights)
        self._names = control_names(global_weights)
        self._sum = {
            n: torch.zeros(global_weights[n].shape, dtype=torch.float64) for n in self._names
        }
        self._summed = 0
        self._held = []

    def preview(self, update: Tensors, num_examples: int) -> None:
        model, _ = split_update(update)
        super().preview(model, num_examples)

    def accumulate(self, update: Tensors, num_examples: int) -> None:
        model, control = split_update(update)
        if sorted(control) != self._names:
            raise ValueError(
                f"a SCAFFOLD update must carry a control delta for each of {self._names}, "
                f"got {sorted(control)}"
            )
        held_before = len(self._buffer)
        super().accumulate(model, num_examples)
        if (
            len(self._buffer) > held_before
        ):  # the round holds it: its clipping factor is not known yet
            self._held.append(control)
        else:  # folded now, with the clipping factor it got
            self._add(control, self._report.scales[-1])

    def _add(self, control: Tensors, scale: float) -> None:
        for name in self._names:
            self._sum[name].add_(control[name].detach().to(torch.float64), alpha=scale)
        self._summed += 1

    def finish(self) -> Weights:
        new = super().finish()
        if self._held:
            used = self._report.selected
            for i, (control, scale) in enumerate(zip(self._held, self._report.scales, strict=True)):
                if used is None or i in used:
                    self._add(control, scale)
            self._held = []
        counted = self._summed
        population = self.population if self.population is not None else counted
        if counted > population:
            raise AggregationError(
                f"SCAFFOLD: {counted} control deltas in a round, but the federation has "
                f"{population} sites"
            )
        if counted:
            for name in self._names:
                base = self.control.get(name)
                step = self._sum[name] / population
                self.control[name] = step if base is None else base + step
        return new

    def state_dict(self) -> dict[str, Any]:
        state = dict(super().state_dict())
        if self.control:
            state["control"] = {name: t.clone() for name, t in self.control.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rest = {k: v for k, v in state.items() if k != "control"}
        super().load_state_dict(rest)
        control = state.get("control", {})
        self.control = {n: t.to(torch.float64).clone() for n, t in control.items()}
