"""Checkpoints: global weights + strategy state + round, committed atomically, verified on read.

Write order is weights, strategy state, then the manifest; a round's checkpoint exists
only once its manifest does, so a crash mid-write leaves the previous checkpoint as the
latest. Every read recomputes SHA-256 digests against the manifest.

Strategy state is JSON (``strategy.json``); the tensors in it (server momentum, optimizer
moments) go to ``strategy.safetensors`` beside it, referenced from the JSON as
``{"$tensor": path}``, with the file's digest under the JSON's ``"$tensors"`` key. The
manifest pins the JSON, the JSON pins the tensors: every byte of a resumed strategy is
verified, and it continues exactly where it stopped. A state without tensors (FedAvg's
``{}``) is written as before, and has no tensor file.
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
from fedround.tasks.core.strategies.state import join_tensors, split_tensors
from fedround.tasks.object_store import ObjectStore

WEIGHTS = "weights.safetensors"
STRATEGY = "strategy.json"
STRATEGY_TENSORS = "strategy.safetensors"
TENSORS_KEY = "$tensors"  # in strategy.json: {"object", "sha256", "nbytes"} of the tensors
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
    state, tensors = encode_strategy_state(strategy_state)
    store.put(prefix + WEIGHTS, payload)
    if tensors is not None:
        store.put(prefix + STRATEGY_TENSORS, tensors)
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


def encode_strategy_state(state: dict[str, Any]) -> tuple[bytes, bytes | None]:
    """(``strategy.json`` bytes, ``strategy.safetensors`` bytes or ``None`` without tensors)."""
    plain, tensors = split_tensors(state)
    if not tensors:
        return json.dumps(plain, sort_keys=True).encode(), None
    payload = weights_to_bytes(tensors)
    plain[TENSORS_KEY] = {
        "object": STRATEGY_TENSORS,
        "sha256": sha256_hex(payload),
        "nbytes": len(payload),
    }
    return json.dumps(plain, sort_keys=True).encode(), payload


def strategy_tensors_sha256(state: bytes) -> str | None:
    """The digest ``strategy.json`` pins its tensor file to (``None``: it has none)."""
    reference = json.loads(state).get(TENSORS_KEY)
    return None if reference is None else str(reference["sha256"])


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
    strategy_state = _decode_strategy_state(store, prefix, state, f"round {round_} of run {run_id}")
    return Checkpoint(manifest=manifest, weights=weights, strategy_state=strategy_state)


def _decode_strategy_state(
    store: ObjectStore, prefix: str, state: bytes, which: str
) -> dict[str, Any]:
    """``strategy.json`` with its tensors joined back in, each byte checked."""
    plain = json.loads(state)
    reference = plain.pop(TENSORS_KEY, None)
    if reference is None:
        return dict(plain)
    key = prefix + STRATEGY_TENSORS
    try:
        payload = store.get(key)
    except ObjectNotFound:
        raise CheckpointError(
            f"checkpoint {which} is incomplete: {store.uri(key)} is missing"
        ) from None
    actual = sha256_hex(payload)
    if actual != reference["sha256"]:
        raise CheckpointError(
            f"checkpoint {which} is corrupted: {store.uri(key)} has sha256 {actual[:12]}…, "
            f"its strategy.json says {str(reference['sha256'])[:12]}…. Restore it from a "
            "backup, or delete that round's checkpoint folder to resume from the round before."
        )
    try:
        return join_tensors(plain, weights_from_bytes(payload))
    except (UpdateRejected, ValueError) as exc:
        raise CheckpointError(f"checkpoint {which}: strategy state is unreadable: {exc}") from exc


def latest_checkpoint(store: ObjectStore, federation: str, run_id: str) -> Checkpoint | None:
    """The newest committed checkpoint of a run, verified; ``None`` for a new run."""
    rounds = committed_rounds(store, federation, run_id)
    return load_checkpoint(store, federation, run_id, rounds[-1]) if rounds else None
