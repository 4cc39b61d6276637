"""How much each update counts: example-weighted or uniform, with a per-site cap.

A site reports its own example count; validation bounds it by what its data contract saw,
and the cap bounds its *share*: no site's weight may exceed ``max_share`` of the round's
total, whatever count it reports. The capped weights are the water-filling solution
wₖ' = min(wₖ, c) with c chosen so that c = max_share · Σ wₖ' (the largest weights are cut
to a common level, the others keep theirs), in the spirit of the bounded per-user weights
of DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018: wₖ = min(nₖ/ŵ, 1)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

WeightingMode = Literal["examples", "uniform"]


def capped_weights(weights: Sequence[float], max_share: float) -> list[float]:
    """``weights`` cut so that no one exceeds ``max_share`` of their sum.

    Unchanged when no weight is too large. When the cap cannot hold (fewer than
    ``1 / max_share`` updates), every update gets the same weight: the closest the round
    can come to the cap (the config check keeps such rounds below the quorum).
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    n = len(weights)
    if n == 0 or max_share == 1:
        return list(weights)
    if any(not w > 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    if n * max_share < 1 - 1e-9:
        return [1.0] * n
    order = sorted(range(n), key=lambda i: (-weights[i], i))  # largest first, stable
    rest = float(sum(weights))
    capped = 0
    level = max_share * rest
    while capped < n:
        room = 1 - max_share * capped
        if room <= 0:  # unreachable in exact arithmetic; a guard against rounding
            capped = n
            break
        level = max_share * rest / room
        if weights[order[capped]] <= level:
            break
        rest -= weights[order[capped]]
        capped += 1
    if capped == 0:
        return list(weights)
    if capped == n:  # n · max_share == 1 up to rounding: every site at the cap
        return [1.0] * n
    cut = set(order[:capped])
    return [level if i in cut else float(weights[i]) for i in range(n)]


class Weighting:
    """Raw weight per update (its example count, or 1) and the per-site share cap."""

    def __init__(self, mode: WeightingMode = "examples", max_share: float = 1.0) -> None:
        if mode not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {mode!r}")
        if not 0 < max_share <= 1:
            raise ValueError(f"max_site_share must be in (0, 1], got {max_share}")
        self.mode = mode
        self.max_share = max_share

    @property
    def needs_round(self) -> bool:
        """Whether an update's weight depends on the other updates of its round."""
        return self.max_share < 1

    def raw(self, num_examples: int) -> int:
        return num_examples if self.mode == "examples" else 1

    def weights(self, counts: Sequence[int]) -> list[float]:
        """The weights of a round's updates, capped (example counts stay integers when
        no cap applies, so the default path computes exactly what FedAvg always did)."""
        return capped_weights([self.raw(n) for n in counts], self.max_share)
