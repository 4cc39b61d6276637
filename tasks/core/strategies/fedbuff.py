"""FedBuff: asynchronous rounds with a buffer of staleness-weighted updates.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek and Huba, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022, Algorithm 1. Sites train continuously,
each on whichever global version it last downloaded; the server does not wait for a
round's slowest site. Each arriving delta Δₖ is weighted by its staleness
τₖ = (current version) − (the version the site trained on)::

    s(τ) = (1 + τ)^(−a)                   the paper's polynomial staleness weight, a = ½
    buffer ← buffer + s(τₖ)·Δₖ            for every accepted delta
    after every K accepted deltas:        x ← ServerOpt(x, buffer / K);  version += 1

A delta staler than ``max_staleness`` is rejected with the reason, and so is one that
claims a version the server has not made yet or does not fit the model. With a
:class:`~.clipping.NormClipping` rule, each accepted delta is first clipped like a
synchronous round's: ``median`` mode bounds it by multiplier × the median norm of the
last ``norm_window`` accepted deltas (itself included), since there is no round to take
the median of. The buffer is one float64 sum of the model: O(model) memory whatever K is.
Its state (version, the partial buffer, the recent norms, the server optimizer's state)
is checkpointed like every other strategy's, so a restarted coordinator goes on with the
same partial buffer, bit for bit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..serialization import Weights
from .base import ServerOptimizer, Tensors
from .clipping import NormClipping, scaled, update_norm
from .fedavg import FedAvg


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """s(τ) = (1 + τ)^(−exponent): 1 for a fresh update, smaller the staler it is."""
    if staleness < 0:
        raise ValueError(f"staleness must be ≥ 0, got {staleness}")
    return float((1.0 + staleness) ** -exponent)


@dataclass(frozen=True)
class Submission:
    """What the server did with one site's delta."""

    accepted: bool
    staleness: int
    weight: float  # s(τ), 0 when rejected
    applied: bool  # this delta filled the buffer: a new global version was made
    version: int  # the global version after this submission
    reason: str | None = None  # why it was rejected
    clip_factor: float = 1.0  # < 1: the delta was clipped by this factor


class BufferedAsync:
    """The coordinator side of FedBuff over a :class:`ServerOptimizer` (FedAvg's plain
    step by default: x ← x + η·mean)."""

    name = "fedbuff"

    def __init__(
        self,
        weights: Tensors,
        *,
        buffer_size: int,
        max_staleness: int,
        staleness_exponent: float = 0.5,
        optimizer: ServerOptimizer | None = None,
        clipping: NormClipping | None = None,
        norm_window: int = 20,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size (K) must be ≥ 1, got {buffer_size}")
        if max_staleness < 1:
            raise ValueError(f"max_staleness must be ≥ 1, got {max_staleness}")
        if not staleness_exponent >= 0:
            raise ValueError(f"staleness_exponent must be ≥ 0, got {staleness_exponent}")
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.staleness_exponent = staleness_exponent
        self.optimizer = optimizer or FedAvg()
        self.clipping = clipping or NormClipping("off")
        if norm_window < 1:
            raise ValueError(f"norm_window must be ≥ 1, got {norm_window}")
        self._norms: deque[float] = deque(maxlen=norm_window)
        self._weights: Weights = {name: t.detach().clone() for name, t in weights.items()}
        self.version = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._count = 0

    @property
    def weights(self) -> Weights:
        """The current global weights (version :attr:`version`); do not modify them."""
        return self._weights

    @property
    def buffered(self) -> int:
        """Accepted deltas waiting in the buffer (fewer than K)."""
        return self._count

    def submit(self, delta: Tensors, base_version: int) -> Submission:
        """Fold one site's delta, trained on global version ``base_version``."""
        if base_version > self.version or base_version < 0:
            return self._reject(
                0,
                f"trained on version {base_version}, which the server has not made "
                f"(current version {self.version})",
            )
        staleness = self.version - base_version
        if staleness > self.max_staleness:
            return self._reject(
                staleness,
                f"staleness {staleness} is above max_staleness {self.max_staleness} "
                f"(trained on version {base_version}, current {self.version})",
            )
        misfit = self._misfit(delta)
        if misfit:
            return self._reject(staleness, misfit)
        factor = 1.0
        if self.clipping.needs_norms:
            norm = update_norm(delta)
            self._norms.append(norm)
            bound, _ = self.clipping.bound_for(list(self._norms))
            factor = self.clipping.scale(norm, bound)
            delta = scaled(delta, factor)
        weight = staleness_weight(staleness, self.staleness_exponent)
        for name, value in delta.items():
            weighted = value.detach().to(torch.float64) * weight
            if name in self._buffer:
                self._buffer[name].add_(weighted)
            else:
                self._buffer[name] = weighted
        self._count += 1
        applied = self._count == self.buffer_size
        if applied:
            mean = {name: total / self.buffer_size for name, total in self._buffer.items()}
            self._weights = self.optimizer.step(self._weights, mean)
            self.version += 1
            self._buffer, self._count = {}, 0
        return Submission(True, staleness, weight, applied, self.version, clip_factor=factor)

    def _reject(self, staleness: int, reason: str) -> Submission:
        return Submission(False, staleness, 0.0, False, self.version, reason)

    def _misfit(self, delta: Tensors) -> str | None:
        if set(delta) != set(self._weights):
            extra = sorted(set(delta) - set(self._weights))
            missing = sorted(set(self._weights) - set(delta))
            return f"does not fit the model (unknown tensors {extra}, missing {missing})"
        for name, value in delta.items():
            if value.shape != self._weights[name].shape:
                return (
                    f"tensor {name!r} has shape {tuple(value.shape)}, the model's is "
                    f"{tuple(self._weights[name].shape)}"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"tensor {name!r} has non-finite values"
        return None

    def state_dict(self) -> dict[str, Any]:
        """Version, the partial buffer and the optimizer's state (weights are separate)."""
        state: dict[str, Any] = {"version": self.version, "buffered": self._count}
        if self._norms:
            state["norms"] = list(self._norms)
        if self._count:
            state["buffer"] = {name: t.clone() for name, t in self._buffer.items()}
        optimizer = self.optimizer.state_dict()
        if optimizer:
            state["optimizer"] = optimizer
        return state

    def load_state_dict(self, state: Mapping[str, Any], weights: Tensors) -> None:
        """Restore :meth:`state_dict` together with the global weights of that version."""
        unknown = sorted(set(state) - {"version", "buffered", "buffer", "norms", "optimizer"})
        if unknown:
            raise ValueError(f"fedbuff state has unknown keys {unknown}")
        count = int(state.get("buffered", 0))
        buffer = state.get("buffer", {})
        if not 0 <= count < self.buffer_size or bool(count) != bool(buffer):
            raise ValueError(
                f"fedbuff state holds {count} buffered updates with "
                f"{'a' if buffer else 'no'} buffer (K = {self.buffer_size})"
            )
        self.version = int(state["version"])
        self._norms.clear()
        self._norms.extend(float(n) for n in state.get("norms", []))
        self._count = count
        self._buffer = {name: t.to(torch.float64).clone() for name, t in buffer.items()}
        self._weights = {name: t.detach().clone() for name, t in weights.items()}
        self.optimizer.load_state_dict(state.get("optimizer", {}))
