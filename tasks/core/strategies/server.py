"""A server-side strategy: weighting → clipping → aggregation → server optimizer.

One round, for the round's valid updates Δ₁…Δₙ (deltas, in sorted site order) with
example counts n₁…nₙ:

1. weights wₖ = nₖ (or 1), capped so no site's share exceeds ``max_site_share``;
2. each update clipped to the bound B (fixed, or multiplier × the round's median norm);
3. the aggregator combines them into one delta (weighted mean, median, trimmed mean,
   Krum, Multi-Krum);
4. the server optimizer applies it to the global weights (FedAvg, FedAvgM, FedAdam, …).

Memory. With the mean (every server optimizer's default aggregator) the round streams:
O(model), whatever the number of sites. When step 1 or 2 needs the whole round (a cap
below 1, median-based clipping) every update is previewed first (its norm and count are
kept, its tensors dropped) and folded on a second pass: still O(model). A caller that
skips the preview gets the same result, bit for bit, with the round held in memory. The
robust aggregators need the round's updates together: O(n × model), n bounded by
``max_buffered_updates`` (the config refuses more sites than that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..serialization import Weights
from .base import (
    AggregationError,
    Aggregator,
    RoundReport,
    ServerOptimizer,
    Strategy,
    StreamingAggregator,
    Tensors,
)
from .clipping import NormClipping, scaled, update_norm
from .mean import WeightedMean
from .weighting import Weighting


class ServerStrategy(Strategy):
    """The strategy a federation config names: its server optimizer, aggregator,
    clipping and weighting. Its state is the optimizer's."""

    def __init__(
        self,
        optimizer: ServerOptimizer,
        aggregator: Aggregator | None = None,
        clipping: NormClipping | None = None,
        weighting: Weighting | None = None,
        max_buffered_updates: int = 1000,
    ) -> None:
        self.optimizer = optimizer
        self.aggregator: Aggregator = aggregator if aggregator is not None else WeightedMean()
        self.clipping = clipping if clipping is not None else NormClipping("off")
        self.weighting = weighting if weighting is not None else Weighting()
        self.max_buffered_updates = max_buffered_updates
        self.name = optimizer.name
        self._global: dict[str, torch.Tensor] = {}
        self._counts: list[int] = []
        self._norms: list[float] = []
        self._buffer: list[Tensors] = []
        self._weights: list[float] | None = None
        self._bound: float | None = None
        self._previewed = False
        self._folded = 0
        self._report = RoundReport()

    @property
    def streaming(self) -> bool:
        return isinstance(self.aggregator, StreamingAggregator)

    @property
    def needs_preview(self) -> bool:
        return self.streaming and (self.clipping.needs_round or self.weighting.needs_round)

    @property
    def report(self) -> RoundReport:
        return self._report

    def begin_round(self, global_weights: Tensors) -> None:
        self._global = dict(global_weights)
        self._counts, self._norms, self._buffer = [], [], []
        self._weights, self._bound = None, None
        self._previewed = False
        self._folded = 0
        self._report = RoundReport()
        if isinstance(self.aggregator, StreamingAggregator):
            self.aggregator.begin()

    def preview(self, update: Tensors, num_examples: int) -> None:
        if not self.needs_preview:
            raise RuntimeError(f"strategy {self.name} takes no preview pass")
        if self._folded or self._buffer:
            raise RuntimeError("preview every update before the first accumulate")
        self._previewed = True
        self._counts.append(num_examples)
        self._norms.append(update_norm(update) if self.clipping.needs_norms else 0.0)

    def accumulate(self, update: Tensors, num_examples: int) -> None:
        if not self.streaming or (self.needs_preview and not self._previewed):
            # Robust aggregators need the round together; a streaming strategy whose
            # caller skipped the preview gets the same result with the round held.
            self._hold(update, num_examples)
            return
        if self._previewed:
            weight, norm = self._planned(num_examples)
        else:
            weight = self.weighting.raw(num_examples)
            norm = update_norm(update) if self.clipping.needs_norms else 0.0
            self._bound = self.clipping.bound if self.clipping.mode == "fixed" else None
            self._counts.append(num_examples)
            self._norms.append(norm)
        self._fold(update, weight, norm)

    def _hold(self, update: Tensors, num_examples: int) -> None:
        if len(self._buffer) >= self.max_buffered_updates:
            raise AggregationError(
                f"aggregator {self.aggregator.name} holds a round's updates together and is "
                f"limited to {self.max_buffered_updates} (strategy.max_buffered_updates)"
            )
        self._buffer.append(update)
        self._counts.append(num_examples)

    def _fold(self, update: Tensors, weight: float, norm: float) -> None:
        scale = NormClipping.scale(norm, self._bound)
        self._report.scales.append(scale)
        assert isinstance(self.aggregator, StreamingAggregator)
        self.aggregator.add(update, weight, scale)
        self._folded += 1

    def _planned(self, num_examples: int) -> tuple[float, float]:
        """The weight and norm the preview pass found for the next update."""
        if self._weights is None:
            self._plan()
        i = self._folded
        if i >= len(self._counts) or self._counts[i] != num_examples:
            raise RuntimeError(
                "accumulate must see the previewed updates again, in the same order "
                f"(update {i}: {num_examples} examples, previewed {self._counts[i : i + 1]})"
            )
        assert self._weights is not None
        return self._weights[i], self._norms[i]

    def _plan(self) -> None:
        """Round-level rules, once every update's count and norm are known."""
        self._weights = self.weighting.weights(self._counts)
        self._bound, self._report.median_norm = self.clipping.bound_for(self._norms)

    def finish(self) -> Weights:
        if not self.streaming:
            delta = self._aggregate_buffer()
        else:
            if self._buffer:  # held because the preview was skipped: plan, then fold
                held, self._buffer = self._buffer, []
                self._norms = [update_norm(u) if self.clipping.needs_norms else 0.0 for u in held]
                self._plan()
                assert self._weights is not None
                for update, weight, norm in zip(held, self._weights, self._norms, strict=True):
                    self._fold(update, weight, norm)
            elif self._previewed and self._folded != len(self._counts):
                raise RuntimeError(
                    f"previewed {len(self._counts)} updates but accumulated {self._folded}"
                )
            assert isinstance(self.aggregator, StreamingAggregator)
            delta = self.aggregator.result()
            weights = self._weights or [float(self.weighting.raw(n)) for n in self._counts]
            total = float(sum(weights))
            self._report.shares = [w / total for w in weights]
            if self._report.median_norm is None and self._norms and self.clipping.needs_norms:
                _, self._report.median_norm = self.clipping.bound_for(self._norms)
        self._report.norms = list(self._norms) if self.clipping.needs_norms else []
        self._report.clip_bound = self._bound
        new = self.optimizer.step(self._global, delta)
        self._buffer = []
        return new

    def _aggregate_buffer(self) -> Weights:
        """Clip the buffered updates, then hand them to the (robust) aggregator."""
        if self.clipping.needs_norms:
            self._norms = [update_norm(update) for update in self._buffer]
            self._bound, self._report.median_norm = self.clipping.bound_for(self._norms)
        else:
            self._norms = [0.0] * len(self._buffer)
        scales = [NormClipping.scale(norm, self._bound) for norm in self._norms]
        self._report.scales = scales
        updates = [scaled(u, s) for u, s in zip(self._buffer, scales, strict=True)]
        delta = self.aggregator.aggregate(updates, self._counts, self.weighting)
        self._report.selected = self.aggregator.selected
        return delta

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
