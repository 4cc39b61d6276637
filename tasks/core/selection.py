"""Seeded, reproducible choices: which sites take part in a round, and their seeds."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def select_sites(
    eligible: Sequence[str], fraction: float, min_sites: int, seed: int, round_: int
) -> list[str]:
    """Sample ``max(min_sites, ceil(fraction·n))`` of the eligible sites, seeded by round.

    Returns all eligible sites (sorted) when fewer than that are available; the caller
    decides whether the quorum still holds.
    """
    pool = sorted(eligible)
    wanted = max(min_sites, math.ceil(fraction * len(pool)))
    if wanted >= len(pool):
        return pool
    return sorted(random.Random(derive_seed(seed, "select", round_)).sample(pool, wanted))
