"""One exception tree for fedround. Messages say what was wrong and what to do."""

from __future__ import annotations

from enum import StrEnum


class FedroundError(Exception):
    """Base class of every error fedround raises on purpose."""


class ConfigError(FedroundError):
    """A federation or site configuration is invalid. The message names the field."""


class ObjectStoreError(FedroundError):
    """The object store could not be read or written (possibly transient)."""


class ObjectNotFound(ObjectStoreError):
    """A key does not exist in the object store."""


class ObjectTooLarge(ObjectStoreError):
    """An object is larger than the reader allows (read in one request, never whole)."""


class CheckpointError(FedroundError):
    """A checkpoint is missing, incomplete or fails its digest check."""


class QuorumNotReached(FedroundError):
    """Fewer sites than the quorum delivered a valid update in a round."""


class ContractError(FedroundError):
    """A data-contract suite cannot be loaded or run (not a site's data failing it)."""


class RejectReason(StrEnum):
    """Why an update was rejected. Stable codes: they are logged, tracked and audited."""

    TOO_LARGE = "too_large"
    DIGEST_MISMATCH = "digest_mismatch"
    MALFORMED = "malformed"
    WRONG_RUN = "wrong_run"
    WRONG_ROUND = "wrong_round"
    WRONG_SITE = "wrong_site"
    WRONG_KEYS = "wrong_keys"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NOT_FINITE = "not_finite"
    NORM_TOO_LARGE = "norm_too_large"
    BAD_EXAMPLE_COUNT = "bad_example_count"
    BAD_ENCODING = "bad_encoding"  # a compressed update that cannot be decoded
    UNSIGNED = "unsigned"  # no signature, and signatures are required
    UNKNOWN_KEY = "unknown_key"  # signed with a key not registered (or retired) for the site
    FORGED = "forged"  # the signature does not verify: altered, or not the site's


class UpdateRejected(FedroundError):
    """An update failed validation. Never retried: the same bytes fail the same way."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
