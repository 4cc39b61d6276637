"""Client-level DP-FedAvg: clip every site's update, add Gaussian noise to their sum.

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018 (Algorithm 1, the fixed-denominator estimator). Each round:

1. every selected site clips its update Δₖ to L2 norm C: Δₖ·min(1, C/‖Δₖ‖₂)
   (:func:`clip_update`, at the site through :class:`ClipUpdate`);
2. ``central``: the coordinator clips again (a site that skipped step 1 cannot raise the
   sensitivity), sums the clipped updates with *equal* weights, adds N(0, (σC)²) to every
   coordinate of the sum and divides by the round's expected number of sites m, fixed
   before any update arrives: Δ = (ΣΔₖ + N(0, σ²C²I)) / m (:class:`CentralDP`, a wrapper
   over the strategy's server optimizer);
   ``local``: each site adds N(0, (σC)²) to its own clipped update (:class:`LocalNoise`) and
   the coordinator takes the plain equally weighted mean (:class:`LocalDPMean`).

Adding or removing one site changes the sum by at most C, so step 2 is the Gaussian
mechanism with noise multiplier σ; with sites sampled at rate q the accountant
(:mod:`.accounting`) turns T rounds into (ε, δ). The weights never depend on the example
counts the sites report: they are unbounded and self-reported, so they would make the
sensitivity unbounded too. The server optimizer (FedAvg, FedAdam, …) only post-processes
the noised mean, which costs no privacy.

With ``privacy.adaptive_clipping`` (central only) C follows a quantile of the update norms
from round to round (:mod:`.adaptive_clipping`): the coordinator counts the updates within
C, noises the count, and moves C; the sum's noise multiplier is raised so that count and
sum together stay at σ. The sites then send their updates unclipped (the coordinator
clips), since a site clipping to a stale C would hide the norms the quantile is read from.

Norms and noise cover the floating-point tensors; an integer buffer (a BatchNorm's batch
counter) is averaged as it is, like everywhere else in fedround.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

import torch

from ..hooks import ClientHook
from ..serialization import Weights
from ..strategies.base import AggregationError, RoundReport, Strategy, Tensors
from ..strategies.clipping import update_norm
from ..strategies.server import ServerStrategy
from .adaptive_clipping import AdaptiveClipping, next_clip_norm, update_noise_multiplier

CLIP_STATE_KEY = "dp_clip_norm"  # adaptive clipping's next C, in the strategy state
CLIP_TOLERANCE = 0.05
"""Relative excess over C below which the coordinator's re-clipping is not *reported* as
clipping (it is still applied): a site's own float32 clipping lands within ~1e-7 of C, and
8-bit quantization after clipping within a few per cent. Reported clipping costs a site a
reputation strike; a site that skipped clipping is usually far above C."""


def clip_update(update: Tensors, clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """(``update`` scaled to L2 norm at most ``clip_norm``, the factor applied).

    The norm is over the floating-point tensors (float64); integer tensors are returned as
    they are. An update already within the bound is returned unchanged (factor 1.0).
    """
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValueError("the update is not finite: it cannot be clipped")
    if norm <= clip_norm:
        return dict(update), 1.0
    factor = clip_norm / norm
    return {
        name: (tensor.to(torch.float64) * factor).to(tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in update.items()
    }, factor


def noise_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with 63 secret random bits when ``None``
    (the default in a run: whoever knows the seed can subtract the noise)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def gaussian_noise(
    like: Tensors, stddev: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """N(0, stddev²) float64 noise shaped like each floating-point tensor of ``like``
    (drawn in sorted name order, so a seed gives the same noise on every machine)."""
    if not stddev >= 0 or not math.isfinite(stddev):
        raise ValueError(f"noise stddev must be a finite number >= 0, got {stddev}")
    return {
        name: torch.randn(like[name].shape, generator=generator, dtype=torch.float64) * stddev
        for name in sorted(like)
        if like[name].is_floating_point()
    }


def add_noise(update: Tensors, stddev: float, generator: torch.Generator) -> Weights:
    """``update`` plus :func:`gaussian_noise` (in float64, back to each tensor's dtype)."""
    noise = gaussian_noise(update, stddev, generator)
    return {
        name: (tensor.to(torch.float64) + noise[name]).to(tensor.dtype) if name in noise else tensor
        for name, tensor in update.items()
    }


class ClipUpdate(ClientHook):
    """The site's half of central DP-FedAvg: the finished update is clipped to C (a client
    hook, see :mod:`fedround.tasks.core.hooks`)."""

    def __init__(self, clip_norm: float) -> None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = clip_norm
        self.factor = 1.0

    def update(self, delta: Weights) -> Weights:
        clipped, self.factor = clip_update(delta, self.clip_norm)
        return clipped


class LocalNoise(ClipUpdate):
    """Local DP-FedAvg at the site: clip the update to C, then add N(0, (σC)²) to every
    coordinate, before it leaves the site. The coordinator only ever sees noised updates."""

    def __init__(self, noise_multiplier: float, clip_norm: float, seed: int | None = None) -> None:
        super().__init__(clip_norm)
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        self.noise_multiplier = noise_multiplier
        self.generator = noise_generator(seed)

    def update(self, delta: Weights) -> Weights:
        clipped = super().update(delta)
        return add_noise(clipped, self.noise_multiplier * self.clip_norm, self.generator)


class _EqualSum:
    """Streaming sum of updates with equal weights (float64, O(model)); integer tensors are
    summed as they are, for their plain mean."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, update: Tensors) -> None:
        if not self.sums:
            self.sums = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in update.items()}
        elif update.keys() != self.sums.keys():
            raise ValueError("all updates of a round must have the same tensor names")
        for name, tensor in update.items():
            self.sums[name].add_(tensor.detach().to(torch.float64))
        self.count += 1


class _DPWrapper(Strategy):
    """Shared lifecycle: equal weights, no preview pass, the inner strategy's server
    optimizer (and its state) for the step."""

    def __init__(self, inner: ServerStrategy) -> None:
        if not inner.streaming:
            raise ValueError(
                "DP-FedAvg wraps a streaming (mean) strategy, not aggregator "
                f"{inner.aggregator.name}"
            )
        self.inner = inner
        self.name = f"dp-{inner.name}"
        self._global: dict[str, torch.Tensor] = {}
        self._sum = _EqualSum()
        self._report = RoundReport()

    @property
    def report(self) -> RoundReport:
        return self._report

    def begin_round(self, global_weights: Tensors) -> None:
        self._global = dict(global_weights)
        self._sum = _EqualSum()
        self._report = RoundReport()

    def _step(self, delta: Weights) -> Weights:
        if self._sum.count:
            self._report.shares = [1.0 / self._sum.count] * self._sum.count
        return self.inner.optimizer.step(self._global, delta)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


class CentralDP(_DPWrapper):
    """Central DP-FedAvg over a streaming strategy (McMahan et al., ICLR 2018): clip each
    update to C, sum with equal weights, add N(0, (σC)²) per coordinate, divide by the
    round's expected number of sites; the inner strategy's server optimizer applies the
    result.

    ``expected_sites`` (m) is fixed before the round's updates arrive (the sites selected):
    a site that drops out lowers the sum, never the denominator, so one site moves the
    estimate by at most C/m and the noise σC/m matches it. Memory: O(model).
    """

    def __init__(
        self,
        inner: ServerStrategy,
        noise_multiplier: float,
        clip_norm: float,
        expected_sites: int,
        seed: int | None = None,
        adaptive: AdaptiveClipping | None = None,
    ) -> None:
        super().__init__(inner)
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if expected_sites < 1:
            raise ValueError(f"expected_sites must be >= 1, got {expected_sites}")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm  # this round's C (adaptive: from the checkpointed state)
        self.expected_sites = expected_sites
        self.seed = seed
        self.adaptive = adaptive
        self.count_noise = (
            adaptive.count_noise(noise_multiplier, expected_sites) if adaptive else None
        )
        # The sum's own noise multiplier: σ, or z_Δ > σ when the count is released too.
        self.sum_noise_multiplier = (
            update_noise_multiplier(noise_multiplier, self.count_noise)
            if self.count_noise is not None
            else noise_multiplier
        )
        self.next_clip_norm = clip_norm
        self.unclipped_fraction: float | None = None  # noised b̄ of the last round
        self._unclipped = 0

    @property
    def noise_stddev(self) -> float:
        """The noise on the averaged update: σ·C / m (z_Δ·C / m with adaptive clipping)."""
        return self.sum_noise_multiplier * self.clip_norm / self.expected_sites

    def begin_round(self, global_weights: Tensors) -> None:
        super().begin_round(global_weights)
        self._unclipped = 0

    def state_dict(self) -> dict[str, Any]:
        state = self.inner.state_dict()
        if self.adaptive is not None:
            state[CLIP_STATE_KEY] = self.next_clip_norm  # checkpointed: a resume keeps C
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rest = {k: v for k, v in state.items() if k != CLIP_STATE_KEY}
        self.inner.load_state_dict(rest)
        stored = state.get(CLIP_STATE_KEY)
        if self.adaptive is not None and stored is not None:
            value = float(stored)
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"checkpointed clip norm {stored!r} is not a number > 0")
            self.clip_norm = self.next_clip_norm = value

    def accumulate(self, update: Tensors, num_examples: int) -> None:
        del num_examples  # self-reported and unbounded: DP-FedAvg weighs sites alike
        wide = {  # clip in float64: the bound holds exactly, not up to float32 rounding
            name: t.detach().to(torch.float64) if t.is_floating_point() else t
            for name, t in update.items()
        }
        norm = update_norm(wide)
        self._report.norms.append(norm)
        self._unclipped += norm <= self.clip_norm
        clipped, factor = clip_update(wide, self.clip_norm)
        # A site that clipped its own update may arrive a rounding error above C: that
        # is no clipping worth reporting (clipped sites get a reputation strike).
        self._report.scales.append(factor if factor < 1 - CLIP_TOLERANCE else 1.0)
        self._sum.add(clipped)

    def finish(self) -> Weights:
        if not self._sum.count:
            raise AggregationError("no updates were added")
        if self._sum.count > self.expected_sites:
            raise AggregationError(
                f"{self._sum.count} updates for {self.expected_sites} expected sites: the "
                "denominator must not be smaller than the sites that can contribute"
            )
        generator = noise_generator(self.seed)
        noise = gaussian_noise(
            self._sum.sums, self.sum_noise_multiplier * self.clip_norm, generator
        )
        delta: Weights = {}
        for name, total in self._sum.sums.items():
            if name in noise:
                delta[name] = (total + noise[name]) / self.expected_sites
            else:  # integer buffers: the plain mean of what arrived
                delta[name] = total / self._sum.count
        self._report.clip_bound = self.clip_norm
        if self.adaptive is not None and self.count_noise is not None:
            self.next_clip_norm, self.unclipped_fraction = next_clip_norm(
                self.clip_norm,
                self._unclipped,
                self.expected_sites,
                self.adaptive,
                self.count_noise,
                generator,
            )
        return self._step(delta)


class LocalDPMean(_DPWrapper):
    """The coordinator's half of local DP-FedAvg: the equally weighted mean of the sites'
    (already clipped and noised) updates, applied by the inner strategy's optimizer. It
    adds no noise and clips nothing (clipping a noised update would only bias it)."""

    def accumulate(self, update: Tensors, num_examples: int) -> None:
        del num_examples
        self._report.scales.append(1.0)
        self._sum.add(update)

    def finish(self) -> Weights:
        if not self._sum.count:
            raise AggregationError("no updates were added")
        return self._step({n: t / self._sum.count for n, t in self._sum.sums.items()})


def wrap_strategy(
    inner: ServerStrategy,
    mode: str,
    noise_multiplier: float,
    clip_norm: float,
    expected_sites: int,
    seed: int | None = None,
    adaptive: AdaptiveClipping | None = None,
) -> Strategy:
    """The coordinator's DP-FedAvg around ``inner`` (built from the ``strategy:`` section):
    :class:`CentralDP` for ``mode: central`` (with ``adaptive`` clipping when given),
    :class:`LocalDPMean` for ``mode: local``."""
    if mode == "central":
        return CentralDP(inner, noise_multiplier, clip_norm, expected_sites, seed, adaptive)
    if adaptive is not None:
        raise ValueError("adaptive clipping needs mode: central (the coordinator reads the norms)")
    if mode == "local":
        return LocalDPMean(inner)
    raise ValueError(f"privacy mode must be central or local, got {mode!r}")
