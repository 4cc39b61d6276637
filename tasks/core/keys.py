"""Object-store key layout. Predictable, per federation and run, per site for updates.

::

    <federation>/<run>/contract.json
    <federation>/<run>/round-0003/global.safetensors   (+ global.json manifest)
    <federation>/<run>/round-0003/updates/<site>.safetensors   (+ <site>.json)
    <federation>/<run>/checkpoints/round-0003/{weights.safetensors,strategy.json,manifest.json}
"""

from __future__ import annotations

import re

_ROUND = re.compile(r"/round-(\d+)/")


def run_prefix(federation: str, run_id: str) -> str:
    return f"{federation}/{run_id}/"


def contract_key(federation: str, run_id: str) -> str:
    return f"{run_prefix(federation, run_id)}contract.json"


def round_prefix(federation: str, run_id: str, round_: int) -> str:
    return f"{run_prefix(federation, run_id)}round-{round_:04d}/"


def global_key(federation: str, run_id: str, round_: int) -> str:
    return f"{round_prefix(federation, run_id, round_)}global.safetensors"


def global_manifest_key(federation: str, run_id: str, round_: int) -> str:
    return f"{round_prefix(federation, run_id, round_)}global.json"


def update_key(federation: str, run_id: str, round_: int, site: str) -> str:
    return f"{round_prefix(federation, run_id, round_)}updates/{site}.safetensors"


def update_manifest_key(federation: str, run_id: str, round_: int, site: str) -> str:
    return f"{round_prefix(federation, run_id, round_)}updates/{site}.json"


def checkpoint_prefix(federation: str, run_id: str, round_: int) -> str:
    return f"{run_prefix(federation, run_id)}checkpoints/round-{round_:04d}/"


def checkpoint_rounds(keys: list[str]) -> list[int]:
    """Round numbers of committed checkpoints (those with a manifest), ascending."""
    rounds = {
        int(m.group(1))
        for key in keys
        if "/checkpoints/" in key and key.endswith("/manifest.json") and (m := _ROUND.search(key))
    }
    return sorted(rounds)
