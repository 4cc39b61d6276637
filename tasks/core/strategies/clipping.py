"""Server-side clipping of update norms, before aggregation.

Each update Δₖ is scaled to min(1, B / ‖Δₖ‖₂)·Δₖ. Norm bounding is the standard defence
against boosted (model-replacement) updates: Sun, Kairouz, Suresh and McMahan, "Can You
Really Backdoor Federated Learning?", arXiv:1911.07963, 2019. The bound B is either fixed
or derived from the round itself, B = multiplier × median of the round's update norms:
the median is the quantile Andrew, Thakkar, McMahan and Ramaswamy ("Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021) track privately across rounds; here the
server computes it exactly, for the round it clips.

The default multiplier, 5, leaves honest heterogeneity alone (non-IID sites with more
data take more local steps, and their updates are a few times the median's size) while
an update boosted to outweigh the round (a sole attacker among n sites must scale its
update by about n) is cut back to a few honest updates' worth. A majority of colluding
sites can move the median itself; the robust aggregators handle that case.

Norms are over the floating-point tensors only (an integer buffer such as a BatchNorm's
batch counter is not a direction in weight space); scaling touches only those tensors.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Literal

import torch

from .base import Tensors

ClipMode = Literal["median", "fixed", "off"]

DEFAULT_MULTIPLIER = 5.0


def update_norm(update: Tensors) -> float:
    """The L2 norm of an update over all its floating-point tensors (float64, name order)."""
    squared = 0.0
    for name in sorted(update):
        tensor = update[name]
        if tensor.is_floating_point():
            squared += float(tensor.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(squared)


def scaled(update: Tensors, scale: float) -> dict[str, torch.Tensor]:
    """``scale × update`` on the floating-point tensors (integer ones as they are)."""
    if scale == 1.0:
        return dict(update)
    return {
        name: tensor * scale if tensor.is_floating_point() else tensor
        for name, tensor in update.items()
    }


class NormClipping:
    """The clipping rule of a strategy: ``median`` (bound = multiplier × the round's
    median norm), ``fixed`` (a configured bound) or ``off``."""

    def __init__(
        self,
        mode: ClipMode = "median",
        multiplier: float = DEFAULT_MULTIPLIER,
        bound: float | None = None,
    ) -> None:
        if mode not in ("median", "fixed", "off"):
            raise ValueError(f"clip mode must be median, fixed or off, got {mode!r}")
        if mode == "median" and not multiplier >= 1:
            raise ValueError(f"clip multiplier must be >= 1, got {multiplier}")
        if mode == "fixed" and (bound is None or not bound > 0):
            raise ValueError(f"fixed clipping needs a bound > 0, got {bound}")
        self.mode = mode
        self.multiplier = multiplier
        self.bound = bound

    @property
    def needs_round(self) -> bool:
        """Whether the bound depends on the whole round (its median norm)."""
        return self.mode == "median"

    @property
    def needs_norms(self) -> bool:
        return self.mode != "off"

    def bound_for(self, norms: Sequence[float]) -> tuple[float | None, float | None]:
        """(bound, median norm) for a round whose updates have ``norms``."""
        if self.mode == "off" or not norms:
            return None, None
        median = statistics.median(norms)
        if self.mode == "fixed":
            return self.bound, median
        return self.multiplier * median, median

    @staticmethod
    def scale(norm: float, bound: float | None) -> float:
        """The factor that brings an update of ``norm`` within ``bound`` (1.0 if it is)."""
        if bound is None or norm <= bound:
            return 1.0
        return bound / norm
