"""SCAFFOLD at the coordinator: publish the server's control variate for a round.

c comes from the last committed checkpoint's strategy state (zeros before the first
round), is written beside the round's global model under the site-readable prefix
(:func:`~fedround.tasks.core.keys.global_control_key`), and its digest goes into every
round spec, so a site trains with exactly the c the coordinator will update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedround.tasks.core import keys
from fedround.tasks.core.serialization import Weights, sha256_hex, weights_to_bytes
from fedround.tasks.core.strategies.scaffold import server_control
from fedround.tasks.object_store import ObjectStore


def publish_control(
    store: ObjectStore,
    federation: str,
    run_id: str,
    round_: int,
    strategy_state: Mapping[str, Any],
    global_weights: Weights,
) -> str:
    """Write the round's c where the sites fetch it; return its sha256 for the round spec."""
    payload = weights_to_bytes(server_control(strategy_state, global_weights))
    store.put(keys.global_control_key(federation, run_id, round_), payload)
    return sha256_hex(payload)
