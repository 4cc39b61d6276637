"""Strategy state through checkpoints: server momentum and optimizer moments are saved as
safetensors beside strategy.json, digest-checked, and a run that resumes from a
checkpoint (the flow rebuilds its strategy from the last checkpoint every round) ends
with the same bytes as one that kept its strategy in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedround.tasks.checkpoints import (
    STRATEGY,
    STRATEGY_TENSORS,
    WEIGHTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedround.tasks.core import keys
from fedround.tasks.core.config import StrategyConfig
from fedround.tasks.core.errors import CheckpointError
from fedround.tasks.core.serialization import weights_to_bytes
from fedround.tasks.core.strategies import build_strategy
from fedround.tasks.core.strategies.state import join_tensors, split_tensors
from fedround.tasks.object_store import LocalObjectStore
from fedround.tasks.retention import copy_run_checkpoints, prune_checkpoints

STATEFUL = [
    StrategyConfig(name="fedavgm"),
    StrategyConfig(name="fedadam", server_lr=0.05),
    StrategyConfig(name="fedyogi", aggregator="median"),
    StrategyConfig(name="fedadagrad", aggregator="trimmed_mean", trim_beta=0.2),
]


def _rounds(count: int = 4, sites: int = 5) -> list[list[tuple[dict[str, torch.Tensor], int]]]:
    rng = np.random.default_rng(3)
    return [
        [
            (
                {
                    "conv.weight": torch.from_numpy(rng.normal(0, 0.1, (4, 3)).astype(np.float32)),
                    "conv.bias": torch.from_numpy(rng.normal(0, 0.1, 4).astype(np.float32)),
                },
                int(rng.integers(5, 50)),
            )
            for _ in range(sites)
        ]
        for _ in range(count)
    ]


def _aggregate(strategy, weights, updates):
    strategy.begin_round(weights)
    if strategy.needs_preview:
        for delta, n in updates:
            strategy.preview(delta, n)
    for delta, n in updates:
        strategy.accumulate(delta, n)
    return strategy.finish()


INITIAL = {"conv.weight": torch.zeros(4, 3), "conv.bias": torch.ones(4)}


def _save(store, round_, weights, config, state):
    return save_checkpoint(
        store,
        federation="fed",
        run_id="run",
        round_=round_,
        weights=weights,
        strategy=config.name,
        strategy_state=state,
        config_sha256="c" * 64,
    )


@pytest.mark.parametrize("config", STATEFUL, ids=lambda c: f"{c.name}-{c.aggregator}")
def test_resumed_from_checkpoints_equals_kept_in_memory_byte_for_byte(
    tmp_path: Path, config: StrategyConfig
) -> None:
    rounds = _rounds()
    # Kept in memory: one strategy object for the whole run.
    kept = build_strategy(config)
    weights = INITIAL
    for updates in rounds:
        weights = _aggregate(kept, weights, updates)
    # Resumed: as the flow does, a fresh strategy from the last checkpoint every round
    # (which is what a crashed run resumes from).
    store = LocalObjectStore(tmp_path)
    _save(store, 0, INITIAL, config, build_strategy(config.name).state_dict())
    for round_, updates in enumerate(rounds, start=1):
        previous = latest_checkpoint(store, "fed", "run")
        assert previous is not None and previous.round == round_ - 1
        strategy = build_strategy(config)
        strategy.load_state_dict(previous.strategy_state)
        new = _aggregate(strategy, previous.weights, updates)
        _save(store, round_, new, config, strategy.state_dict())
    final = load_checkpoint(store, "fed", "run", len(rounds))
    # Assert: the same weights, bytes for bytes, and the same optimizer state
    assert weights_to_bytes(final.weights) == weights_to_bytes(weights)
    assert weights_to_bytes(split_tensors(final.strategy_state)[1]) == weights_to_bytes(
        split_tensors(kept.state_dict())[1]
    )
    prefix = keys.checkpoint_prefix("fed", "run", len(rounds))
    assert store.exists(prefix + STRATEGY_TENSORS)
    assert not torch.equal(final.weights["conv.bias"], INITIAL["conv.bias"])


def test_fedavg_checkpoints_keep_their_format(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    strategy = build_strategy("fedavg")
    weights = _aggregate(strategy, INITIAL, _rounds(1)[0])
    _save(store, 1, weights, StrategyConfig(), strategy.state_dict())
    prefix = keys.checkpoint_prefix("fed", "run", 1)
    assert store.get(prefix + STRATEGY) == b"{}"
    assert not store.exists(prefix + STRATEGY_TENSORS)
    assert load_checkpoint(store, "fed", "run", 1).strategy_state == {}


def _stateful_checkpoint(store: LocalObjectStore) -> str:
    config = StrategyConfig(name="fedadam")
    strategy = build_strategy(config)
    weights = _aggregate(strategy, INITIAL, _rounds(1)[0])
    _save(store, 1, weights, config, strategy.state_dict())
    return keys.checkpoint_prefix("fed", "run", 1)


def test_a_corrupted_or_missing_tensor_file_is_refused(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    prefix = _stateful_checkpoint(store)
    good = store.get(prefix + STRATEGY_TENSORS)
    store.put(prefix + STRATEGY_TENSORS, good[:-8] + b"\x00" * 8)
    with pytest.raises(CheckpointError, match=r"corrupted: .*strategy\.safetensors has sha256"):
        load_checkpoint(store, "fed", "run", 1)
    store.delete(prefix + STRATEGY_TENSORS)
    with pytest.raises(CheckpointError, match=r"incomplete: .*strategy\.safetensors is missing"):
        load_checkpoint(store, "fed", "run", 1)


def test_backup_copies_and_prune_deletes_the_tensor_file(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    source = LocalObjectStore(tmp_path / "a")
    prefix = _stateful_checkpoint(source)
    backup = LocalObjectStore(tmp_path / "b")
    report = copy_run_checkpoints(source, backup, "fed", "run")
    assert report.files == 4
    assert backup.get(prefix + STRATEGY_TENSORS) == source.get(prefix + STRATEGY_TENSORS)
    load_checkpoint(backup, "fed", "run", 1)  # verifies every digest
    _save(source, 2, INITIAL, StrategyConfig(), {})  # round 1 is no longer the run's latest
    pruned = prune_checkpoints(
        source,
        {},
        older_than=timedelta(0),
        now=datetime.now(UTC) + timedelta(days=1),
        registry_check=False,  # no registry here: nothing registered to protect
    )
    assert len(pruned.deleted) == 1
    assert not source.exists(prefix + STRATEGY_TENSORS)
    assert not source.exists(prefix + WEIGHTS)


def test_state_split_and_join_round_trip_and_refuse_loose_ends() -> None:
    state = {"steps": 3, "m": {"w": torch.ones(2, dtype=torch.float64)}, "v": {}}
    plain, tensors = split_tensors(state)
    assert plain == {"steps": 3, "m": {"w": {"$tensor": "m/w"}}, "v": {}}
    joined = join_tensors(plain, tensors)
    assert joined["steps"] == 3 and torch.equal(joined["m"]["w"], state["m"]["w"])
    with pytest.raises(ValueError, match="missing"):
        join_tensors(plain, {})
    with pytest.raises(ValueError, match="not referenced"):
        join_tensors(plain, {**tensors, "x": torch.zeros(1)})
    with pytest.raises(ValueError, match="without '/'"):
        split_tensors({"a/b": 1})
