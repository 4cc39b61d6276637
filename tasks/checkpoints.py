"""Checkpoints: global weights + strategy state + round, committed atomically, verified on read.

Write order is weights, strategy state, then the manifest; a round's checkpoint exists
only once its manifest does, so a crash mid-write leaves the previous checkpoint as the
latest. Every read recomputes SHA-256 digests against the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedround.tasks.core import keys
from fedround.tasks.core.errors import CheckpointError, ObjectNotFound, UpdateRejected
from fedround.tasks.core.manifest import CheckpointManifest
from fedround.tasks.core.serialization import (
    Weights,
    sha256_hex,
    weights_from_bytes,
    weights_to_bytes,
)
from fedround.tasks.object_store import ObjectStore

WEIGHTS = "weights.safetensors"
STRATEGY = "strategy.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Checkpoint:
    manifest: CheckpointManifest
    weights: Weights
    strategy_state: dict[str, Any]

    @property
    def round(self) -> int:
        return self.manifest.round


def save_checkpoint(
    store: ObjectStore,
    *,
    federation: str,
    run_id: str,
    round_: int,
    weights: Weights,
    strategy: str,
    strategy_state: dict[str, Any],
    config_sha256: str,
    metrics: dict[str, float] | None = None,
    sites: list[str] | None = None,
) -> CheckpointManifest:
    """Write a checkpoint for ``round_`` (0 = the initial model) and commit it."""
    prefix = keys.checkpoint_prefix(federation, run_id, round_)
    payload = weights_to_bytes(weights)
    state = json.dumps(strategy_state, sort_keys=True).encode()
    store.put(prefix + WEIGHTS, payload)
    store.put(prefix + STRATEGY, state)
    manifest = CheckpointManifest(
        federation=federation,
        run_id=run_id,
        round=round_,
        weights_sha256=sha256_hex(payload),
        weights_nbytes=len(payload),
        strategy=strategy,
        strategy_state_sha256=sha256_hex(state),
        config_sha256=config_sha256,
        metrics=metrics or {},
        sites=sites or [],
    )
    store.put(prefix + MANIFEST, manifest.to_json())
    return manifest


def committed_rounds(store: ObjectStore, federation: str, run_id: str) -> list[int]:
    return keys.checkpoint_rounds(store.list(keys.checkpoints_prefix(federation, run_id)))


def read_manifest(
    store: ObjectStore, federation: str, run_id: str, round_: int
) -> CheckpointManifest:
    key = keys.checkpoint_prefix(federation, run_id, round_) + MANIFEST
    try:
        return CheckpointManifest.from_json(store.get(key))
    except ObjectNotFound:
        raise CheckpointError(
            f"no committed checkpoint for round {round_} of run {run_id} ({store.uri(key)})"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint manifest {store.uri(key)} is unreadable: {exc}") from exc


def load_checkpoint(store: ObjectStore, federation: str, run_id: str, round_: int) -> Checkpoint:
    """Read and verify a committed checkpoint; raise :class:`CheckpointError` if it is bad."""
    manifest = read_manifest(store, federation, run_id, round_)
    prefix = keys.checkpoint_prefix(federation, run_id, round_)
    try:
        payload = store.get(prefix + WEIGHTS)
        state = store.get(prefix + STRATEGY)
    except ObjectNotFound as exc:
        raise CheckpointError(
            f"checkpoint round {round_} of run {run_id} is incomplete: {exc}"
        ) from exc
    for name, data, expected in (
        (WEIGHTS, payload, manifest.weights_sha256),
        (STRATEGY, state, manifest.strategy_state_sha256),
    ):
        actual = sha256_hex(data)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint round {round_} of run {run_id} is corrupted: "
                f"{store.uri(prefix + name)} has sha256 {actual[:12]}…, its manifest says "
                f"{expected[:12]}…. Restore it from a backup, or delete that round's checkpoint "
                "folder to resume from the round before."
            )
    try:
        weights = weights_from_bytes(payload)
    except UpdateRejected as exc:
        raise CheckpointError(f"checkpoint round {round_} of run {run_id}: {exc.detail}") from exc
    return Checkpoint(manifest=manifest, weights=weights, strategy_state=json.loads(state))


def latest_checkpoint(store: ObjectStore, federation: str, run_id: str) -> Checkpoint | None:
    """The newest committed checkpoint of a run, verified; ``None`` for a new run."""
    rounds = committed_rounds(store, federation, run_id)
    return load_checkpoint(store, federation, run_id, rounds[-1]) if rounds else None
