"""SCAFFOLD (Karimireddy et al., ICML 2020, option II): a hand-computed round with two sites
and one parameter (site correction, cᵢ⁺, server step and c), the control deltas under
clipping, validation of the control tensors, and a resume through real checkpoints that
ends byte for byte where an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedround.tasks.checkpoints import STRATEGY_TENSORS, latest_checkpoint, save_checkpoint
from fedround.tasks.core import keys
from fedround.tasks.core.config import ClipConfig, StrategyConfig
from fedround.tasks.core.errors import RejectReason, UpdateRejected
from fedround.tasks.core.hooks import ControlVariate, apply_update_hooks, hooks_installed
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.serialization import sha256_hex, weights_to_bytes
from fedround.tasks.core.strategies import Scaffold, build_strategy
from fedround.tasks.core.strategies.scaffold import server_control, split_update
from fedround.tasks.core.strategies.state import split_tensors
from fedround.tasks.core.validation import UpdateExpectation, tensor_specs, validate_update
from fedround.tasks.object_store import LocalObjectStore

from .scaffold_code import OneWeight


def _one(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value])}


def _site_round(
    x: float, c: float, c_i: float, g: float, steps: int, lr: float
) -> tuple[dict[str, torch.Tensor], ControlVariate]:
    """A user's own loop (plain SGD on loss = g·w, K steps) with SCAFFOLD's hook around it;
    returns the update as uploaded (Δy and control/w) and the hook."""
    model = OneWeight()
    with torch.no_grad():
        model.w.fill_(x)
    hook = ControlVariate(_one(c), _one(c_i), learning_rate=lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with hooks_installed(model, [hook]):
        for _ in range(steps):
            optimizer.zero_grad()
            (g * model.w).sum().backward()
            optimizer.step()
    delta = {"w": model.w.detach() - x}
    return apply_update_hooks([hook], delta), hook


def _round(strategy: Scaffold, global_weights, updates) -> dict[str, torch.Tensor]:
    strategy.begin_round(global_weights)
    if strategy.needs_preview:
        for update, n in updates:
            strategy.preview(update, n)
    for update, n in updates:
        strategy.accumulate(update, n)
    return strategy.finish()


def test_hand_computed_round_two_sites_one_parameter() -> None:
    # Prepare: x = 1, c = 0.5, η_l = 0.25, K = 2 steps; site A: cᵢ = 0.25, gradient 2,
    # 1 example; site B: cᵢ = 0.5, gradient −1, 3 examples; N = 4 sites, η_g = 2.
    # Execute: the sites' rounds
    update_a, hook_a = _site_round(x=1.0, c=0.5, c_i=0.25, g=2.0, steps=2, lr=0.25)
    update_b, hook_b = _site_round(x=1.0, c=0.5, c_i=0.5, g=-1.0, steps=2, lr=0.25)

    # Assert (sites): A steps with 2 − 0.25 + 0.5 = 2.25: y = 1 − 2·0.25·2.25 = −0.125,
    # Δy = −1.125; cᵢ⁺ = 0.25 − 0.5 + 1.125/(2·0.25) = 2, Δc = 1.75.
    # B steps with −1 − 0.5 + 0.5 = −1: y = 1.5, Δy = 0.5; cᵢ⁺ = 0.5 − 0.5 − 1 = −1, Δc = −1.5.
    assert hook_a.steps == 2 and hook_b.steps == 2
    assert update_a["w"].item() == -1.125 and update_a["control/w"].item() == 1.75
    assert update_b["w"].item() == 0.5 and update_b["control/w"].item() == -1.5
    assert hook_a.updated is not None and hook_a.updated["w"].item() == 2.0
    assert hook_b.updated is not None and hook_b.updated["w"].item() == -1.0

    # Execute: the server's round
    strategy = build_strategy(StrategyConfig(name="scaffold", server_lr=2.0), population=4)
    assert isinstance(strategy, Scaffold)
    strategy.load_state_dict({"control": {"w": torch.tensor([0.5], dtype=torch.float64)}})
    new = _round(strategy, _one(1.0), [(update_a, 1), (update_b, 3)])

    # Assert (server): x = 1 + 2·(1·(−1.125) + 3·0.5)/4 = 1.1875;
    # c = 0.5 + (2/4)·mean(1.75, −1.5) = 0.5625
    assert new["w"].dtype == torch.float32 and new["w"].item() == 1.1875
    state = strategy.state_dict()
    assert state["control"]["w"].dtype == torch.float64
    assert state["control"]["w"].item() == 0.5625
    assert server_control(state, new)["w"].tolist() == [0.5625]


def test_without_a_population_every_round_is_full_participation() -> None:
    strategy = build_strategy(StrategyConfig(name="scaffold"))
    updates = [
        ({"w": torch.tensor([0.0]), "control/w": torch.tensor([1.75])}, 1),
        ({"w": torch.tensor([0.0]), "control/w": torch.tensor([-1.5])}, 3),
    ]
    _round(strategy, _one(1.0), updates)
    _round(strategy, _one(1.0), updates)
    # c = 0 + mean(1.75, −1.5) per round, twice
    assert strategy.state_dict()["control"]["w"].item() == 0.25


def test_a_clipped_update_counts_its_control_delta_with_the_same_factor() -> None:
    # Prepare: fixed bound 1: site B's model delta (norm 4) is clipped to a quarter
    config = StrategyConfig(
        name="scaffold", weighting="uniform", clip=ClipConfig(mode="fixed", bound=1.0)
    )
    strategy = build_strategy(config, population=2)
    updates = [
        ({"w": torch.tensor([1.0]), "control/w": torch.tensor([2.0])}, 1),
        ({"w": torch.tensor([4.0]), "control/w": torch.tensor([8.0])}, 1),
    ]
    # Execute
    new = _round(strategy, _one(0.0), updates)
    # Assert: x = (1 + 4/4)/2 = 1; c = (2 + 8/4)/2 = 2
    assert strategy.report.scales == [1.0, 0.25]
    assert new["w"].item() == 1.0
    assert strategy.state_dict()["control"]["w"].item() == 2.0


def test_a_robust_aggregator_counts_the_control_deltas_of_the_updates_it_used() -> None:
    # Krum with f = 0 over w = 0, 1, 1.5, 4 scores each by its 2 nearest neighbours:
    # 3.25, 1.25, 2.5, 15.25, and keeps w = 1
    strategy = build_strategy(
        StrategyConfig(name="scaffold", aggregator="krum", krum_f=0, clip=ClipConfig(mode="off"))
    )
    updates = [
        ({"w": torch.tensor([w]), "control/w": torch.tensor([c])}, 1)
        for w, c in ((0.0, 1.0), (1.0, 3.0), (1.5, 5.0), (4.0, 9.0))
    ]
    new = _round(strategy, _one(0.0), updates)
    assert strategy.report.selected == [1]
    assert new["w"].item() == 1.0
    assert strategy.state_dict()["control"]["w"].item() == 3.0  # N = |S| = 1 used update


def test_an_update_without_its_control_deltas_is_refused_by_the_strategy() -> None:
    strategy = build_strategy(StrategyConfig(name="scaffold"))
    strategy.begin_round(_one(0.0))
    with pytest.raises(ValueError, match="control delta"):
        strategy.accumulate(_one(1.0), 1)


def test_a_tensor_without_gradient_gets_a_zero_variate_and_no_step_keeps_it() -> None:
    # Prepare: a model with a buffer (no gradient ever) and a parameter
    model = nn.BatchNorm1d(1)
    weights = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    c = {name: torch.full_like(t, 0.5) for name, t in weights.items()}
    c_i = {name: torch.full_like(t, 0.25) for name, t in weights.items()}
    hook = ControlVariate(c, c_i, learning_rate=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Execute: one step
    with hooks_installed(model, [hook]):
        optimizer.zero_grad()
        model(torch.tensor([[1.0], [3.0]])).sum().backward()
        optimizer.step()
    new = model.state_dict()
    delta = {name: new[name] - weights[name] for name in weights}
    update = hook.update(delta)
    # Assert: buffers get cᵢ⁺ = 0 (Δc = −0.25); the bias's gradient is 2 (+0.25 correction):
    # Δ = −0.1·2.25, cᵢ⁺ = 0.25 − 0.5 + 0.225/0.1 = 2.
    assert hook.steps == 1
    assert hook.updated is not None
    assert hook.updated["running_mean"].tolist() == [0.0]
    assert update["control/running_mean"].tolist() == [-0.25]
    assert hook.updated["bias"].item() == pytest.approx(2.0, abs=1e-6)
    # With no step at all, cᵢ stays and the control deltas are zero
    idle = ControlVariate(c, c_i, learning_rate=0.1)
    zero = idle.update({name: torch.zeros_like(t) for name, t in weights.items()})
    assert idle.steps == 0
    assert all(float(zero[f"control/{n}"].abs().sum()) == 0.0 for n in weights)


# --- validation -----------------------------------------------------------------------


def _manifest(payload: bytes) -> UpdateManifest:
    return UpdateManifest(
        federation="fed",
        run_id="run",
        round=1,
        site="a",
        nonce="n",
        num_examples=1,
        sha256=sha256_hex(payload),
        nbytes=len(payload),
    )


def _expectation(control: bool, max_norm: float | None = None) -> UpdateExpectation:
    weights = {"w": torch.zeros(2), "steps": torch.zeros(1, dtype=torch.int64)}
    return UpdateExpectation(
        federation="fed",
        run_id="run",
        round=1,
        nonce="n",
        site="a",
        specs=tensor_specs(weights, control=control),
        max_bytes=1 << 20,
        max_num_examples=10,
        max_norm=max_norm,
    )


def test_control_tensors_are_accepted_in_scaffold_runs_only() -> None:
    update = {
        "w": torch.tensor([0.5, 0.5]),
        "steps": torch.tensor([0]),
        "control/w": torch.tensor([30.0, 40.0]),
    }
    payload = weights_to_bytes(update)
    # SCAFFOLD: accepted; the integer buffer has no control tensor; the norm limit is on
    # the model delta only (‖Δc‖ = 50 would exceed it)
    accepted = validate_update(_manifest(payload), payload, _expectation(True, max_norm=1.0))
    assert sorted(accepted) == ["control/w", "steps", "w"]
    # Any other strategy: rejected, naming the tensors
    with pytest.raises(UpdateRejected) as rejected:
        validate_update(_manifest(payload), payload, _expectation(False))
    assert rejected.value.reason == RejectReason.WRONG_KEYS
    assert "control/w" in str(rejected.value) and "SCAFFOLD" in str(rejected.value)
    # SCAFFOLD without the control tensors, or with the wrong shape: rejected
    plain = weights_to_bytes({"w": torch.zeros(2), "steps": torch.tensor([0])})
    with pytest.raises(UpdateRejected) as missing:
        validate_update(_manifest(plain), plain, _expectation(True))
    assert missing.value.reason == RejectReason.WRONG_KEYS
    bad = weights_to_bytes({**update, "control/w": torch.zeros(3)})
    with pytest.raises(UpdateRejected) as shaped:
        validate_update(_manifest(bad), bad, _expectation(True))
    assert shaped.value.reason == RejectReason.WRONG_SHAPE


# --- resume ---------------------------------------------------------------------------


def _rounds(count: int = 4, sites: int = 5) -> list[list[tuple[dict[str, torch.Tensor], int]]]:
    rng = np.random.default_rng(11)

    def tensor(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(rng.normal(0, 0.1, shape).astype(np.float32))

    return [
        [
            (
                {
                    "conv.weight": tensor((4, 3)),
                    "conv.bias": tensor((4,)),
                    "control/conv.weight": tensor((4, 3)),
                    "control/conv.bias": tensor((4,)),
                },
                int(rng.integers(5, 50)),
            )
            for _ in range(sites)
        ]
        for _ in range(count)
    ]


INITIAL = {"conv.weight": torch.zeros(4, 3), "conv.bias": torch.ones(4)}
CONFIG = StrategyConfig(name="scaffold", server_lr=0.5)


def test_resumed_from_checkpoints_equals_kept_in_memory_byte_for_byte(tmp_path: Path) -> None:
    rounds = _rounds()
    # Kept in memory: one strategy for the whole run, 8 sites in the federation
    kept = build_strategy(CONFIG, population=8)
    weights = INITIAL
    published = []
    for updates in rounds:
        published.append(weights_to_bytes(server_control(kept.state_dict(), weights)))
        weights = _round(kept, weights, updates)
    # Resumed: a fresh strategy from the last checkpoint every round, as the flow does
    store = LocalObjectStore(tmp_path)

    def save(round_: int, new, state) -> None:
        save_checkpoint(
            store,
            federation="fed",
            run_id="run",
            round_=round_,
            weights=new,
            strategy=CONFIG.name,
            strategy_state=state,
            config_sha256="c" * 64,
        )

    save(0, INITIAL, build_strategy(CONFIG.name).state_dict())
    for round_, updates in enumerate(rounds, start=1):
        previous = latest_checkpoint(store, "fed", "run")
        assert previous is not None
        # the c the coordinator publishes for this round is the one kept in memory
        control = weights_to_bytes(server_control(previous.strategy_state, previous.weights))
        assert control == published[round_ - 1]
        strategy = build_strategy(CONFIG, population=8)
        strategy.load_state_dict(previous.strategy_state)
        save(round_, _round(strategy, previous.weights, updates), strategy.state_dict())
    final = latest_checkpoint(store, "fed", "run")
    # Assert: same weights and the same control variate, bytes for bytes
    assert final is not None and final.round == len(rounds)
    assert weights_to_bytes(final.weights) == weights_to_bytes(weights)
    assert weights_to_bytes(split_tensors(final.strategy_state)[1]) == weights_to_bytes(
        split_tensors(kept.state_dict())[1]
    )
    assert store.exists(keys.checkpoint_prefix("fed", "run", len(rounds)) + STRATEGY_TENSORS)
    assert float(final.strategy_state["control"]["conv.bias"].abs().sum()) > 0


def test_split_update_separates_the_control_deltas() -> None:
    model, control = split_update({"w": torch.zeros(1), "control/w": torch.ones(1)})
    assert list(model) == ["w"] and list(control) == ["w"]
