"""Adaptive clipping for central DP-FedAvg: the clip norm follows a quantile of the norms.

Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021 (Algorithm 1, geometric update). A fixed clip norm C has to be
guessed before training: too small and every update is cut down (bias), too large and the
noise σC drowns the signal. Adaptive clipping moves C each round towards the
``target_quantile`` γ of the update norms:

1. the coordinator counts the round's updates with norm ≤ C (before clipping them);
2. it adds Gaussian noise N(0, σ_b²) to that count (the count is released too, so it is
   privatized like the sum) and divides by the round's expected sites m: b̄;
3. C ← C · exp(−η · (b̄ − γ)) for the next round.

The count query and the sum query together are one Gaussian mechanism with the configured
noise multiplier z, as the accountant assumes, when the sum's noise multiplier is raised to
z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al., Theorem 1): so the accountant's ε stays
exact and the update costs a little more noise. This needs σ_b > z/2. The paper's default
σ_b = m/20 suits large rounds; fedround uses max(m/20, z), which for a small round raises
the sum's noise by at most 1/√(3/4) ≈ 1.155.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdaptiveClipping:
    """The settings of the clip norm's update (``privacy.adaptive_clipping``)."""

    target_quantile: float = 0.5  # γ: the fraction of updates left unclipped
    learning_rate: float = 0.2  # η: the geometric step
    count_noise_multiplier: float | None = None  # σ_b; None: max(m/20, z)

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not 0 < self.learning_rate <= 10 or not math.isfinite(self.learning_rate):
            raise ValueError(f"learning_rate must be in (0, 10], got {self.learning_rate}")
        if self.count_noise_multiplier is not None and not (
            self.count_noise_multiplier > 0 and math.isfinite(self.count_noise_multiplier)
        ):
            raise ValueError(
                f"count_noise_multiplier must be a finite number > 0, got "
                f"{self.count_noise_multiplier}"
            )

    def count_noise(self, noise_multiplier: float, expected_sites: int) -> float:
        """σ_b for a round of ``expected_sites`` sites under total noise multiplier z."""
        if self.count_noise_multiplier is not None:
            return self.count_noise_multiplier
        return max(expected_sites / 20.0, noise_multiplier)


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_Δ, the sum's noise multiplier that keeps the count and the sum together at z:
    (z⁻² − (2σ_b)⁻²)^(−1/2). A :class:`ValueError` when σ_b ≤ z/2 (no such z_Δ)."""
    if not noise_multiplier > 0 or not count_noise > 0:
        raise ValueError("noise multipliers must be > 0")
    if count_noise <= noise_multiplier / 2:
        raise ValueError(
            f"privacy.adaptive_clipping.count_noise_multiplier σ_b = {count_noise:g} must be "
            f"more than half the noise multiplier z = {noise_multiplier:g}: the count query "
            "would use up the whole privacy of the round"
        )
    return float((noise_multiplier**-2 - (2 * count_noise) ** -2) ** -0.5)


def next_clip_norm(
    clip_norm: float,
    unclipped: int,
    expected_sites: int,
    settings: AdaptiveClipping,
    count_noise: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """(the next round's C, the noised unclipped fraction b̄ it was moved by).

    ``unclipped``: the round's updates with norm ≤ ``clip_norm``; ``expected_sites``: the
    round's fixed denominator m (the sites selected)."""
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    if expected_sites < 1 or not 0 <= unclipped <= expected_sites:
        raise ValueError(f"{unclipped} unclipped updates of {expected_sites} expected sites")
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_noise
    fraction = (unclipped + noise) / expected_sites
    return clip_norm * math.exp(-settings.learning_rate * (fraction - settings.target_quantile)), (
        fraction
    )
