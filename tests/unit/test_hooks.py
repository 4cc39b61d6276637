"""Client hooks: a strategy acts inside a training loop that knows nothing of it."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from fedround.tasks.core.config import StrategyConfig
from fedround.tasks.core.hooks import (
    ClientHook,
    ProximalTerm,
    apply_update_hooks,
    hooks_for,
    hooks_installed,
)
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.strategies import STRATEGIES, build_strategy


def linear(weight: list[float], bias: float) -> nn.Linear:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight]))
        model.bias.copy_(torch.tensor([bias]))
    return model


def users_sgd_step(model: nn.Module, x: torch.Tensor, lr: float) -> None:
    """A user's own loop: loss = sum of outputs, plain SGD. No FedProx anywhere."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()


def test_proximal_term_adds_mu_times_distance_to_the_global_weights() -> None:
    # Prepare: w = [1, 2], b = 0.5; global w = [0, 0], b = 0; x = [1, 3] → plain grads [1, 3], 1
    model = linear([1.0, 2.0], 0.5)
    global_weights = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    hooks = hooks_for(StrategyConfig(name="fedprox", mu=0.1), global_weights)

    # Execute: one step of the user's loop, hooks installed around it
    with hooks_installed(model, hooks):
        users_sgd_step(model, torch.tensor([[1.0, 3.0]]), lr=0.5)

    # Assert: grads [1 + 0.1·1, 3 + 0.1·2] and 1 + 0.1·0.5; w ← w − 0.5·grad
    assert model.weight.grad is not None and model.bias.grad is not None
    assert model.weight.grad[0].tolist() == pytest.approx([1.1, 3.2], abs=1e-6)
    assert model.bias.grad.tolist() == pytest.approx([1.05], abs=1e-6)
    assert model.weight.detach()[0].tolist() == pytest.approx([0.45, 0.4], abs=1e-6)
    assert model.bias.detach().tolist() == pytest.approx([-0.025], abs=1e-6)


def test_proximal_term_uses_the_current_weights_at_every_step() -> None:
    # Prepare: 1-D, w = 2, global 0, grad of w·x with x = 1 is 1, mu = 0.5, lr = 0.1
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    hooks = [ProximalTerm(0.5, {"weight": torch.zeros(1, 1)})]

    # Execute: two steps
    with hooks_installed(model, hooks):
        for _ in range(2):
            users_sgd_step(model, torch.ones(1, 1), lr=0.1)

    # Assert: w1 = 2 − 0.1·(1 + 0.5·2) = 1.8; w2 = 1.8 − 0.1·(1 + 0.5·1.8) = 1.61
    assert model.weight.item() == pytest.approx(1.61, abs=1e-6)


def test_without_hooks_the_step_is_plain_sgd() -> None:
    model = linear([1.0, 2.0], 0.5)
    with hooks_installed(model, hooks_for(StrategyConfig(), {"weight": torch.zeros(1, 2)})):
        users_sgd_step(model, torch.tensor([[1.0, 3.0]]), lr=0.5)
    assert model.weight.detach()[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_hooks_are_removed_after_the_block_even_when_training_raises() -> None:
    # Prepare
    model = linear([1.0, 2.0], 0.5)
    hooks = [ProximalTerm(10.0, {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})]

    # Execute: training fails halfway through the block
    def train_then_fail() -> None:
        with hooks_installed(model, hooks):
            model(torch.ones(1, 2)).sum().backward()
            raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        train_then_fail()
    model.zero_grad()
    model(torch.tensor([[1.0, 3.0]])).sum().backward()

    # Assert: the next backward pass sees the plain gradient
    assert model.weight.grad is not None
    assert model.weight.grad.tolist() == [[1.0, 3.0]]


def test_the_anchor_is_a_copy_of_the_global_weights() -> None:
    global_weights = {"weight": torch.zeros(1, 2)}
    hook = ProximalTerm(1.0, global_weights)
    global_weights["weight"].fill_(100.0)  # the caller reuses its tensors
    grad = hook.gradient("weight", torch.ones(1, 2), torch.zeros(1, 2))
    assert grad.tolist() == [[1.0, 1.0]]


def test_parameters_the_global_model_lacks_are_left_alone() -> None:
    hook = ProximalTerm(1.0, {"weight": torch.zeros(1)})
    grad = torch.tensor([0.25])
    assert hook.gradient("other", torch.tensor([5.0]), grad) is grad


def test_negative_mu_is_refused() -> None:
    with pytest.raises(ValueError, match="mu must be >= 0"):
        ProximalTerm(-0.1, {})


def test_hooks_for_builds_one_proximal_term_for_fedprox_only() -> None:
    weights = {"weight": torch.zeros(1)}
    assert hooks_for(StrategyConfig(name="fedavg"), weights) == []
    (hook,) = hooks_for(StrategyConfig(name="fedprox", mu=0.25), weights)
    assert isinstance(hook, ProximalTerm) and hook.mu == 0.25


class _Add(ClientHook):
    def update(self, delta: Weights) -> Weights:
        return {k: v + 1 for k, v in delta.items()}


class _Double(ClientHook):
    def update(self, delta: Weights) -> Weights:
        return {k: v * 2 for k, v in delta.items()}


def test_update_hooks_apply_in_order() -> None:
    delta = {"w": torch.tensor([1.0])}
    assert apply_update_hooks([_Add(), _Double()], delta)["w"].item() == 4.0  # (1 + 1)·2
    assert apply_update_hooks([_Double(), _Add()], delta)["w"].item() == 3.0  # 1·2 + 1
    assert apply_update_hooks([], delta) is delta
    assert apply_update_hooks([ClientHook()], delta)["w"].item() == 1.0


class _Record(ClientHook):
    def __init__(self, log: list[str], tag: str) -> None:
        self.log, self.tag = log, tag

    def gradient(self, name: str, parameter: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        self.log.append(f"{self.tag}:{name}")
        return grad * 2


def test_gradient_hooks_chain_in_order_over_every_trainable_parameter() -> None:
    model = linear([1.0, 2.0], 0.5)
    model.bias.requires_grad_(False)
    log: list[str] = []
    with hooks_installed(model, [_Record(log, "a"), _Record(log, "b")]):
        model(torch.tensor([[1.0, 3.0]])).sum().backward()
    assert log == ["a:weight", "b:weight"]
    assert model.weight.grad is not None
    assert model.weight.grad.tolist() == [[4.0, 12.0]]  # doubled twice


def test_every_configurable_strategy_has_a_server_side() -> None:
    # Prepare: two updates, 1 and 3 examples
    global_weights = {"w": torch.tensor([1.0])}
    updates = [({"w": torch.tensor([4.0])}, 1), ({"w": torch.tensor([0.0])}, 3)]

    configurable = set(typing.get_args(StrategyConfig.model_fields["name"].annotation))
    assert configurable == set(STRATEGIES)
    assert {"fedavg", "fedprox"} <= configurable
    for name in ("fedavg", "fedprox"):
        # Execute
        strategy = build_strategy(name)
        strategy.begin_round(global_weights)
        for delta, n in updates:
            strategy.accumulate(delta, n)

        # Assert: FedProx aggregates as FedAvg: 1 + (1·4 + 3·0) / 4
        assert strategy.name == name
        assert strategy.finish()["w"].item() == 2.0
