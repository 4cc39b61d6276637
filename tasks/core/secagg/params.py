"""The parameters every party of a secure-aggregation round agrees on, and the noise
each site adds for central differential privacy."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import SecAggParameterError
from .fixed_point import FixedPoint

PROTOCOL = "fedround-secagg-v1"


class RoundParams(BaseModel):
    """What every party of a round must agree on. Invalid values raise pydantic's
    ``ValidationError`` (a ``ValueError``) naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    round: int = Field(ge=1)
    nonce: str = Field(min_length=1)
    sites: list[str] = Field(description="the round's selected sites, sorted and unique")
    threshold: int = Field(description="t: fewest sites that must finish every step")
    bits: Literal[32, 64] = 32
    value_range: float = Field(gt=0, allow_inf_nan=False)
    length: int = Field(ge=1, description="coordinates of the (flattened) update")

    @model_validator(mode="after")
    def _check(self) -> Self:
        n = len(self.sites)
        if n < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 sites, got {n}: the sum of one site's "
                "update is that update"
            )
        if any(not site for site in self.sites) or self.sites != sorted(set(self.sites)):
            raise ValueError(
                "sites must be non-empty, sorted and unique (a site's share index is its "
                "position + 1, so every party must list them alike): sort them"
            )
        if not 2 <= self.threshold <= n:
            raise ValueError(
                f"threshold must be between 2 and {n} (the sites), got {self.threshold}"
            )
        if 2 * self.threshold <= n:
            raise ValueError(
                f"threshold {self.threshold} must be more than half of the {n} sites (at "
                f"least {n // 2 + 1}): otherwise a coordinator could tell half the sites that "
                "a site dropped out and the other half that it survived, collect t shares of "
                "both its mask key and its self-mask seed, and unmask its update"
            )
        try:
            self.fixed_point()
        except SecAggParameterError as exc:
            raise ValueError(str(exc)) from None
        return self

    def context(self) -> bytes:
        """Canonical bytes of the round's identity and encoding: every key derivation and
        commitment binds to them, so masks of one round are useless in another."""
        body = {
            "protocol": PROTOCOL,
            "federation": self.federation,
            "run_id": self.run_id,
            "round": self.round,
            "nonce": self.nonce,
            "sites": self.sites,
            "threshold": self.threshold,
            "bits": self.bits,
            "value_range": self.value_range,
            "length": self.length,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    def context_digest(self) -> str:
        return hashlib.sha256(self.context()).hexdigest()

    def fixed_point(self) -> FixedPoint:
        """The encoding: R = ``value_range``, sums of up to len(sites) updates."""
        return FixedPoint(self.bits, self.value_range, len(self.sites))

    def index(self, site: str) -> int:
        """``site``'s Shamir index (its position + 1); :class:`SecAggParameterError` when it
        is not one of the round's sites."""
        try:
            return self.sites.index(site) + 1
        except ValueError:
            raise SecAggParameterError(f"site {site!r} is not one of the round's sites") from None


def distributed_noise_std(noise_multiplier: float, clip: float, threshold: int) -> float:
    """The Gaussian noise std each site adds to its clipped update for central DP under
    secure aggregation: σ·C/√t.

    The coordinator sees only the sum, so it cannot add the noise itself; if each of the
    k ≥ t summed sites adds N(0, σ²C²/t), the sum carries N(0, k/t·σ²C²), at least the
    N(0, σ²C²) of central DP-FedAvg (and the round aborts below t sites). Noise added by
    sites that collude with the coordinator is known to it: against c colluders the
    variance that counts is (k − c)/t·σ²C². Choose ``value_range`` R to cover the noise
    too (a few stds above C), or the clipped count grows.
    """
    if not noise_multiplier >= 0 or not math.isfinite(noise_multiplier):
        raise SecAggParameterError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )
    if not clip > 0 or not math.isfinite(clip):
        raise SecAggParameterError(f"clip must be a finite number > 0, got {clip!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise SecAggParameterError(f"threshold must be an int >= 1, got {threshold!r}")
    return noise_multiplier * clip / math.sqrt(threshold)
