"""Signed dispatch: a site's worker runs only what its federation's coordinator sent.

Prefect's API takes one credential for every party, so anyone holding it (a site, say)
can create a flow run of fedround's own site session in another site's pool, or replay
one the coordinator created. So the coordinator *seals* the parameters of every flow run
it sends to a site: an Ed25519 signature, with its tenant's dispatch key, over the
entrypoint, the target pool, the parameters, a random id and a validity window. The
site's worker checks the seal before the run starts (:mod:`fedround.site_workers.dispatch_check`)
against the coordinator's public keys (pinned in the site's settings, or published by the
coordinator under the federation's read-only prefix, which only its tenant's coordinator
identity may write) and runs each seal once.

So a site, another tenant's coordinator or anyone else with the Prefect credential cannot
make a site run a session or evaluation the federation's coordinator did not send: an
unsealed, forged, re-targeted (other pool or entrypoint), altered, expired or replayed
dispatch is refused, and the run is marked crashed with the reason.
"""

from __future__ import annotations

import binascii
import json
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import FedroundError
from .signing import SIGNATURE_BYTES, RegisteredKey, SigningKey, _b64, _unb64

DOMAIN = b"fedround-dispatch-v1\n"  # never valid as an update manifest's signature
SEAL_PARAMETER = "dispatch"
DEFAULT_TTL = timedelta(minutes=15)  # how long after it was sent a site may still start it
CLOCK_SKEW = timedelta(minutes=2)  # a site's clock may be this far ahead or behind
MAX_TTL = timedelta(days=1)


class DispatchRefused(FedroundError):
    """A flow run whose seal is missing, invalid, expired or already used."""


class DispatchSeal(BaseModel):
    """What the coordinator adds to a site flow run's parameters (as ``dispatch``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")
    key_id: str = Field(min_length=1, max_length=64)
    pool: str = Field(min_length=1, max_length=200)
    entrypoint: str = Field(min_length=1, max_length=200)
    issued_at: datetime
    expires_at: datetime
    signature: str = Field(max_length=200)


class DispatchKeys(BaseModel):
    """The public dispatch keys of a federation's coordinator, oldest first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: str
    tenant: str
    keys: list[RegisteredKey] = Field(default_factory=list, max_length=64)

    def with_key(self, key: RegisteredKey) -> DispatchKeys:
        if any(k.key_id == key.key_id for k in self.keys):
            return self
        return self.model_copy(update={"keys": [*self.keys, key]})

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DispatchKeys:
        return cls.model_validate_json(data)


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def sealed_bytes(
    parameters: Mapping[str, Any],
    *,
    entrypoint: str,
    pool: str,
    id: str,
    key_id: str,
    issued_at: datetime,
    expires_at: datetime,
) -> bytes:
    """The canonical bytes a seal's signature covers: everything but the signature, and
    the run's parameters without the seal, as sorted, compact JSON."""
    body = {
        "entrypoint": entrypoint,
        "pool": pool,
        "parameters": {k: v for k, v in parameters.items() if k != SEAL_PARAMETER},
        "id": id,
        "key_id": key_id,
        "issued_at": _utc(issued_at),
        "expires_at": _utc(expires_at),
    }
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal_parameters(
    parameters: Mapping[str, Any],
    key: SigningKey,
    *,
    entrypoint: str,
    pool: str,
    now: datetime | None = None,
    ttl: timedelta = DEFAULT_TTL,
) -> dict[str, Any]:
    """``parameters`` with a seal (``dispatch``) for a run of ``entrypoint`` in ``pool``."""
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    fields: dict[str, Any] = {
        "entrypoint": entrypoint,
        "pool": pool,
        "id": secrets.token_hex(16),
        "key_id": key.key_id,
        "issued_at": issued,
        "expires_at": issued + ttl,
    }
    signature = _b64(key.sign(sealed_bytes(parameters, **fields)))
    seal = DispatchSeal(**fields, signature=signature)
    plain = {k: v for k, v in parameters.items() if k != SEAL_PARAMETER}
    return {**plain, SEAL_PARAMETER: seal.model_dump(mode="json")}


def verify_seal(
    parameters: Mapping[str, Any],
    *,
    entrypoint: str,
    pool: str,
    keys: Sequence[RegisteredKey],
    now: datetime | None = None,
) -> DispatchSeal:
    """The seal of a flow run of ``entrypoint`` in ``pool``, or :class:`DispatchRefused`
    saying why: no seal, a malformed one, another pool or entrypoint, a key the site does
    not trust, a signature that does not verify (altered parameters), outside its window."""
    raw = parameters.get(SEAL_PARAMETER)
    if raw is None:
        raise DispatchRefused(
            "it carries no coordinator seal: only the federation's coordinator sends work "
            "to this site (a flow run created by hand or by anyone else is refused)"
        )
    try:
        seal = DispatchSeal.model_validate(raw)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "seal"
        raise DispatchRefused(f"its seal is malformed ({where}: {problem['msg']})") from None
    if seal.pool != pool or seal.entrypoint != entrypoint:
        raise DispatchRefused(
            f"its seal was made for {seal.entrypoint!r} in pool {seal.pool!r}, not "
            f"{entrypoint!r} in {pool!r}: a seal cannot be moved to another pool or flow"
        )
    now = now or datetime.now(UTC)
    trusted = [k for k in keys if k.key_id == seal.key_id and k.valid_at(now)]
    if not trusted:
        raise DispatchRefused(
            f"it is sealed with key {seal.key_id!r}, which is not a dispatch key of this "
            f"federation's coordinator (trusted: {[k.key_id for k in keys] or 'none'})"
        )
    try:
        signature = _unb64(seal.signature)
    except (binascii.Error, ValueError):
        raise DispatchRefused("its seal's signature is not base64") from None
    if len(signature) != SIGNATURE_BYTES:
        raise DispatchRefused(f"its seal's signature is {len(signature)} bytes, not 64")
    body = sealed_bytes(parameters, **seal.model_dump(exclude={"signature"}))
    try:
        Ed25519PublicKey.from_public_bytes(_unb64(trusted[0].public_key)).verify(signature, body)
    except InvalidSignature:
        raise DispatchRefused(
            f"its seal does not verify under key {seal.key_id}: the parameters were altered "
            "after the coordinator sealed them, or the seal is forged"
        ) from None
    if seal.expires_at - seal.issued_at > MAX_TTL:
        raise DispatchRefused("its seal is valid for more than a day: refused")
    if now < seal.issued_at - CLOCK_SKEW:
        raise DispatchRefused(f"its seal was issued in the future ({_utc(seal.issued_at)})")
    if now > seal.expires_at + CLOCK_SKEW:
        raise DispatchRefused(
            f"its seal expired at {_utc(seal.expires_at)}: the coordinator sends a new "
            "session when it still needs this site"
        )
    return seal
