"""Manifests: the small JSON records that travel beside every weights file.

Frozen and typed, like dp_accounting's event records. Compatibility rule: fields are only
ever added with a default, never renamed or removed, and ``schema_version`` is bumped
when a reader must behave differently.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


class UpdateManifest(_Frozen):
    """What a site says about the update it uploaded."""

    schema_version: int = 1
    federation: str
    run_id: str
    round: int = Field(ge=1)
    site: str
    attempt: int = Field(default=1, ge=1)
    nonce: str
    num_examples: int
    sha256: str
    nbytes: int = Field(ge=0)
    created_at: datetime = Field(default_factory=utc_now)
    metrics: dict[str, float] = Field(default_factory=dict)
    # How the payload is encoded (see compression.py): dense, q8, topk or topk+q8. Older
    # manifests have no such field: their updates are dense.
    encoding: str = "dense"
    # Ed25519 signature over the identifying fields (see signing.py), and the id of the
    # site key that made it. Older manifests have neither: unsigned, accepted only where
    # signatures are not required.
    key_id: str | None = None
    signature: str | None = None

    @classmethod
    def from_json(cls, data: bytes) -> UpdateManifest:
        return cls.model_validate_json(data)


class GlobalManifest(_Frozen):
    """The global model a round starts from, as published to the sites."""

    schema_version: int = 1
    federation: str
    run_id: str
    round: int = Field(ge=1)
    nonce: str
    sha256: str
    nbytes: int = Field(ge=0)
    deadline_at: datetime | None = None
    created_at: datetime = Field(default_factory=utc_now)

    @classmethod
    def from_json(cls, data: bytes) -> GlobalManifest:
        return cls.model_validate_json(data)


class CheckpointManifest(_Frozen):
    """A committed checkpoint: written last, so its presence means the data is complete."""

    schema_version: int = 1
    federation: str
    run_id: str
    round: int = Field(ge=0)
    weights_sha256: str
    weights_nbytes: int
    strategy: str
    strategy_state_sha256: str
    config_sha256: str
    metrics: dict[str, float] = Field(default_factory=dict)
    sites: list[str] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utc_now)

    @classmethod
    def from_json(cls, data: bytes) -> CheckpointManifest:
        return cls.model_validate_json(data)
