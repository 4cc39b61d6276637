"""The errors of secure aggregation, under fedround's one exception tree."""

from __future__ import annotations

from ..errors import FedroundError, QuorumNotReached


class SecAggError(FedroundError):
    """Base class of the secure-aggregation errors."""


class SecAggParameterError(SecAggError, ValueError):
    """A parameter of the protocol is invalid (threshold, encoding, a value to encode), or a
    step was called out of order: the caller's mistake, the same call fails again. Also a
    ``ValueError``, like pydantic's errors for :class:`RoundParams`."""


class SecAggMessageError(SecAggError, ValueError):
    """A message is malformed or inconsistent with the round. ``site`` is the party it came
    from (``"coordinator"`` for what a site was sent), when known. The coordinator excludes
    the site and goes on; a site drops out of the round. Also a ``ValueError``: bad input."""

    def __init__(self, message: str, site: str | None = None) -> None:
        super().__init__(message)
        self.site = site


class SecAggRefused(SecAggMessageError):
    """A site refuses a request of the coordinator that would expose a site's update
    (revealing both shares of one site, too few survivors, a changed roster)."""


class SecAggAborted(SecAggError, QuorumNotReached):
    """The round cannot finish: fewer than ``threshold`` sites remain at some step, or a
    needed secret cannot be reconstructed. Nothing of the round may be applied."""
