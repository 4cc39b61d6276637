"""The strategy lifecycle, and the parts every server-side strategy is built from.

A round, as :func:`fedround.tasks.aggregation.aggregate_updates` drives it::

    begin_round(global)
    preview(delta, n)      per valid update, in sorted site order   (only if needs_preview)
    accumulate(delta, n)   per valid update, in the same order
    finish()               -> the new global weights

Updates are *deltas* (local weights minus the round's global weights). ``preview`` exists
for rules that need the whole round before they can fold anything in (the median update
norm for clipping, the total weight for a per-site cap): they see every update once first,
keep only a norm and a count, and fold on the second pass, so memory stays O(model).

A strategy's state (server momentum, optimizer moments) survives a restart through
``state_dict`` / ``load_state_dict``: a dict of JSON values and ``torch.Tensor`` leaves,
checkpointed with the global weights (the tensors as safetensors beside the JSON).

Three parts make up a server-side strategy (see :mod:`.server`):

- an :class:`Aggregator` turns the round's updates into one aggregate delta (the weighted
  mean streams; robust rules need the round's updates together),
- a :class:`ServerOptimizer` turns that delta into the new global weights (FedOpt's
  ServerOpt: plain step, momentum, Adam/Yogi/Adagrad),
- weighting and clipping (:mod:`.weighting`, :mod:`.clipping`) decide how much each update
  counts and how large it may be.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import FedroundError
from ..serialization import Weights
from .weighting import Weighting

Tensors = Mapping[str, torch.Tensor]


class AggregationError(FedroundError):
    """A round's valid updates cannot be combined under the configured rule (for example
    Krum with too few updates). The round then has no new global model."""


@dataclass
class RoundReport:
    """What the last round did beyond averaging, one entry per update in fold order."""

    scales: list[float] = field(default_factory=list)  # clipping factor, 1.0 = untouched
    norms: list[float] = field(default_factory=list)  # L2 norm of each update as received
    shares: list[float] = field(default_factory=list)  # each update's share of the weight
    clip_bound: float | None = None
    median_norm: float | None = None
    selected: list[int] | None = None  # Krum / Multi-Krum: the updates that were averaged


class Strategy(ABC):
    """Aggregates site updates into a new global model."""

    name: str

    @property
    def needs_preview(self) -> bool:
        """Whether every update must be :meth:`preview`-ed before the first is folded in."""
        return False

    @abstractmethod
    def begin_round(self, global_weights: Tensors) -> None:
        """Start a round from the current global weights."""

    def preview(self, update: Tensors, num_examples: int) -> None:
        """First pass: see one validated update (its norm and count), fold nothing."""
        del update, num_examples

    @abstractmethod
    def accumulate(self, update: Tensors, num_examples: int) -> None:
        """Fold one validated update (a delta) into the round's aggregate."""

    @abstractmethod
    def finish(self) -> Weights:
        """Close the round and return the new global weights."""

    @property
    def report(self) -> RoundReport:
        """What the last finished round did (clipping, shares, selection)."""
        return RoundReport()

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint: JSON values and tensors (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state written by :meth:`state_dict`."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")


class ServerOptimizer(ABC):
    """Applies the round's aggregate delta to the global weights (FedOpt's ServerOpt:
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 1).

    The delta arrives in float64; the new weights keep the dtype of the old ones.
    Optimizers act on floating-point tensors; integer buffers (a BatchNorm's batch
    counter) take the plain mean delta.
    """

    name: ClassVar[str]

    @abstractmethod
    def step(self, global_weights: Tensors, delta: Tensors) -> Weights:
        """The new global weights from the old ones and the round's aggregate delta."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")


class Aggregator(ABC):
    """Combines a round's (clipped) updates into one float64 aggregate delta.

    ``counts`` are the updates' example counts and ``weighting`` turns them into weights
    (example counts or 1, capped per site) for whichever updates the rule averages; rules
    that are unweighted by definition (median, trimmed mean) ignore them.
    """

    name: ClassVar[str]
    memory: ClassVar[str]  # what it holds at once, e.g. "O(model)" or "O(n × model)"

    @abstractmethod
    def aggregate(
        self, updates: Sequence[Tensors], counts: Sequence[int], weighting: Weighting
    ) -> Weights:
        """The aggregate delta of one round's updates (float64 tensors)."""

    @property
    def selected(self) -> list[int] | None:
        """Indices of the updates the last :meth:`aggregate` used, when it chose some."""
        return None


class StreamingAggregator(Aggregator):
    """An aggregator that folds updates one at a time and keeps O(model) memory."""

    memory = "O(model)"

    @abstractmethod
    def begin(self) -> None:
        """Forget everything added so far."""

    @abstractmethod
    def add(self, update: Tensors, weight: float, scale: float = 1.0) -> None:
        """Fold in ``scale × update`` with ``weight`` (``scale`` applies to float tensors)."""

    @abstractmethod
    def result(self) -> Weights:
        """The aggregate of everything added since :meth:`begin`."""

    def aggregate(
        self, updates: Sequence[Tensors], counts: Sequence[int], weighting: Weighting
    ) -> Weights:
        self.begin()
        for update, weight in zip(updates, weighting.weights(counts), strict=True):
            self.add(update, weight)
        return self.result()


def to_float64(update: Tensors) -> dict[str, torch.Tensor]:
    """Detached float64 copies (the precision every aggregate is computed in)."""
    return {name: tensor.detach().to(torch.float64) for name, tensor in update.items()}


def check_same_keys(updates: Sequence[Tensors]) -> list[str]:
    """The tensor names every update shares, sorted; raises if they differ."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    names = sorted(updates[0])
    for update in updates[1:]:
        if sorted(update) != names:
            raise ValueError("all updates of a round must have the same tensor names")
    return names
