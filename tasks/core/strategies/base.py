"""The strategy lifecycle shared by every aggregation algorithm.

A round is ``begin_round(global)`` → ``accumulate(update, n)`` once per valid site update,
streamed, in any order → ``finish()`` → the new global weights. Updates are *deltas*
(local weights minus the round's global weights). A strategy keeps only O(model) memory,
whatever the number of sites, and its state survives a restart through
``state_dict`` / ``load_state_dict`` (checkpointed with the global weights).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from .serialization import Weights


class Strategy(ABC):
    """Aggregates site updates into a new global model."""

    name: ClassVar[str]

    @abstractmethod
    def begin_round(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        """Start a round from the current global weights."""

    @abstractmethod
    def accumulate(self, update: Mapping[str, torch.Tensor], num_examples: int) -> None:
        """Fold one validated update (a delta) into the round's running aggregate."""

    @abstractmethod
    def finish(self) -> Weights:
        """Close the round and return the new global weights."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state to checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state written by :meth:`state_dict`."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")
