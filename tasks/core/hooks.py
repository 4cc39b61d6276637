"""Client-side strategy hooks: how a strategy acts inside a site's local training without
the training code (fedround's loop or the user's ``train``) knowing.

A hook sees two seams:

- ``gradient(name, parameter, grad)``: called for every parameter's gradient during each
  backward pass (through ``Tensor.register_hook``), so it works with any loss, optimizer
  and training loop. FedProx adds its proximal term here; SCAFFOLD's control variates
  (:class:`ControlVariate`) and per-step clipping fit the same seam.
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

from .config import PrivacyConfig, StrategyConfig
from .serialization import Weights
from .strategies.scaffold import client_variate, control_key


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


class ControlVariate(ClientHook):
    """SCAFFOLD's correction at the site (Karimireddy et al., ICML 2020, Algorithm 1): every
    gradient gains c − cᵢ (the server's control variate minus the site's), so local steps
    follow the federation's direction rather than the site's own.

    ``steps`` counts the local steps K taken: the backward passes the hook saw (the most
    gradient calls any one tensor got). A ``train`` that accumulates gradients over several
    backward passes per optimizer step counts each pass, and gets the correction on each.
    On the finished update, :meth:`update` computes cᵢ⁺ = cᵢ − c + (x − yᵢ)/(K·η_l)
    (option II; exact for plain SGD, an estimate with momentum or Adam), keeps it in
    ``updated`` for the site to persist, and adds Δcᵢ = cᵢ⁺ − cᵢ to the update as
    ``control/<tensor>``. A tensor that got no gradient (a buffer, a frozen parameter) has
    cᵢ⁺ = 0; with no step at all (K = 0) cᵢ stays and Δcᵢ = 0.
    """

    def __init__(
        self,
        server: Mapping[str, torch.Tensor],
        variate: Mapping[str, torch.Tensor],
        learning_rate: float,
    ) -> None:
        if sorted(server) != sorted(variate):
            raise ValueError(
                f"server and site control variates name different tensors: "
                f"{sorted(set(server) ^ set(variate))[:5]}"
            )
        self.server = {name: t.detach().clone() for name, t in server.items()}
        self.variate = {name: t.detach().clone() for name, t in variate.items()}
        self.learning_rate = learning_rate
        self.correction = {name: self.server[name] - self.variate[name] for name in self.server}
        self.calls: dict[str, int] = {}
        self.updated: Weights | None = None

    @property
    def steps(self) -> int:
        return max(self.calls.values(), default=0)

    def gradient(self, name: str, parameter: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        correction = self.correction.get(name)
        if correction is None:
            return grad
        self.calls[name] = self.calls.get(name, 0) + 1
        return grad + correction.to(grad.device, grad.dtype)

    def update(self, delta: Weights) -> Weights:
        steps = self.steps
        trained = {name: self.variate[name] for name in self.variate if name in self.calls}
        updated = client_variate(trained, self.server, delta, steps, self.learning_rate)
        for name, variate in self.variate.items():
            if name not in updated:
                updated[name] = variate.clone() if steps == 0 else torch.zeros_like(variate)
        self.updated = updated
        controls = {
            control_key(name): (updated[name].double() - self.variate[name].double()).to(
                self.variate[name].dtype
            )
            for name in sorted(self.variate)
        }
        return {**delta, **controls}


def hooks_for(
    strategy: StrategyConfig,
    global_weights: Mapping[str, torch.Tensor],
    privacy: PrivacyConfig | None = None,
    seed: int | None = None,
) -> list[ClientHook]:
    """The client hooks a strategy needs at the site (none for plain FedAvg). SCAFFOLD's
    :class:`ControlVariate` needs the site's own variate, so the site builds it (see
    :mod:`fedround.site_workers.scaffold`).

    With ``privacy`` on, the last hook clips the finished update to ``clip_norm``
    (``central``, unless C is adaptive: only the coordinator knows the round's C) or
    clips it and adds the noise (``local``; secret noise unless the config
    fixes ``noise_seed``, then mixed with the round's ``seed``)."""
    hooks: list[ClientHook] = []
    if strategy.name == "fedprox":
        hooks.append(ProximalTerm(strategy.mu, global_weights))
    if privacy is not None and privacy.mode in ("central", "local"):  # record: in the loop
        from .privacy.dp_fedavg import ClipUpdate, LocalNoise

        assert privacy.clip_norm is not None and privacy.noise_multiplier is not None
        if privacy.mode == "central":
            if privacy.adaptive_clipping is None:  # adaptive: the coordinator clips to its C
                hooks.append(ClipUpdate(privacy.clip_norm))
        else:
            noise_seed = None
            if privacy.noise_seed is not None:
                noise_seed = (privacy.noise_seed * 1_000_003 + (seed or 0)) % 2**63
            hooks.append(LocalNoise(privacy.noise_multiplier, privacy.clip_norm, noise_seed))
    return hooks


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
