"""Signed updates: each site signs its update manifest with Ed25519.

A site holds one private key; the coordinator holds the site's registered public keys (a
:class:`KeyRing`, written where only the coordinator writes). The signature covers a
canonical byte string of the manifest's identifying fields (:data:`SIGNED_FIELDS`):
federation, run, round, site, attempt, nonce, the payload's sha256 and size, the example
count, the encoding and the key id. So a tampered field or payload, a manifest replayed
from another round or run (its round, run and nonce no longer match the open round) and
an update signed with an unregistered key are all rejected.

Rotation: a key ring may hold several keys; a key with ``not_after`` is valid until then
(the overlap window of a rotation), one without it until it is replaced.

Key text: a private key is the base64 of its 32 raw bytes (or PEM, PKCS#8); a public key
the base64 of its 32 raw bytes. A key id is the first 16 hex digits of the sha256 of the
raw public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError, RejectReason, UpdateRejected
from .manifest import UpdateManifest

DOMAIN = b"fedround-update-manifest-v1\n"  # never valid as anything else's signature
SIGNED_FIELDS = (
    "federation",
    "run_id",
    "round",
    "site",
    "attempt",
    "nonce",
    "sha256",
    "nbytes",
    "num_examples",
    "encoding",
    "key_id",
)
SIGNATURE_BYTES = 64


def key_id_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.strip().encode(), validate=True)


class RegisteredKey(BaseModel):
    """A site's public key as the coordinator registered it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str
    public_key: str  # base64 of the 32 raw bytes
    not_after: datetime | None = None  # valid until then (rotation overlap); None: no end
    registered_at: datetime | None = None
    revoked_at: datetime | None = None  # revoked (compromised): never valid again
    revoke_reason: str | None = None

    def valid_at(self, now: datetime) -> bool:
        if self.revoked_at is not None:
            return False
        return self.not_after is None or now <= self.not_after

    @classmethod
    def from_text(cls, public_key: str, not_after: datetime | None = None) -> RegisteredKey:
        """A key from its base64 text; a :class:`ConfigError` names what is wrong."""
        try:
            raw = _unb64(public_key)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"public key {public_key[:20]!r}… is not base64: {exc}") from exc
        if len(raw) != 32:
            raise ConfigError(
                f"public key is {len(raw)} bytes, an Ed25519 public key is 32: copy the line "
                "`fedround site init` printed"
            )
        return cls(key_id=key_id_of(raw), public_key=_b64(raw), not_after=not_after)


class KeyRing(BaseModel):
    """All public keys registered for one site, oldest first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str
    keys: list[RegisteredKey] = Field(default_factory=list)

    def valid(self, now: datetime) -> list[RegisteredKey]:
        return [key for key in self.keys if key.valid_at(now)]

    def with_key(self, key: RegisteredKey, retire_others_at: datetime | None = None) -> KeyRing:
        """The ring with ``key`` added (once); with ``retire_others_at``, every other key
        still valid then ends at that time (a rotation's overlap)."""
        others = []
        for old in self.keys:
            if old.key_id == key.key_id:
                continue
            if retire_others_at is not None and old.valid_at(retire_others_at):
                old = old.model_copy(update={"not_after": retire_others_at})
            others.append(old)
        return KeyRing(site=self.site, keys=[*others, key])

    def revoked(self, key_id: str, at: datetime, reason: str) -> KeyRing:
        """The ring with key ``key_id`` revoked from ``at`` on (a :class:`ConfigError` when
        the site has no such key; revoking a revoked key keeps its first revocation)."""
        if not any(key.key_id == key_id for key in self.keys):
            raise ConfigError(
                f"site {self.site} has no key {key_id!r} (registered: "
                f"{[key.key_id for key in self.keys] or 'none'}): see `fedround keys list`"
            )
        return KeyRing(
            site=self.site,
            keys=[
                key.model_copy(update={"revoked_at": at, "revoke_reason": reason})
                if key.key_id == key_id and key.revoked_at is None
                else key
                for key in self.keys
            ],
        )

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> KeyRing:
        return cls.model_validate_json(data)


class PeerKeys(BaseModel):
    """Every site's key ring of one federation, as ``fedround keys export`` writes them for
    the site operators: pinned at each site, they let a site check the other sites'
    secure-aggregation adverts itself instead of trusting the coordinator to relay them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    federation: str
    exported_at: datetime
    rings: dict[str, KeyRing] = Field(default_factory=dict)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PeerKeys:
        return cls.model_validate_json(data)


class SigningKey:
    """A site's Ed25519 private key. Its text never goes to a log: ``repr`` hides it."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public_raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_text(cls, text: str) -> SigningKey:
        """From base64 of the 32 raw bytes, or PEM (PKCS#8); the error never quotes it."""
        stripped = text.strip()
        try:
            if stripped.startswith("-----BEGIN"):
                key = serialization.load_pem_private_key(stripped.encode(), password=None)
                if not isinstance(key, Ed25519PrivateKey):
                    raise ConfigError("the signing key is not an Ed25519 key")
                return cls(key)
            raw = _unb64(stripped)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise ConfigError(
                "the signing key is neither base64 of 32 bytes nor a PEM Ed25519 key"
            ) from exc
        if len(raw) != 32:
            raise ConfigError(f"the signing key is {len(raw)} bytes, an Ed25519 key is 32")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_text(self) -> str:
        """The base64 of the raw private key: for a 0600 file, nothing else."""
        raw = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return _b64(raw)

    @property
    def key_id(self) -> str:
        return key_id_of(self._public_raw)

    @property
    def public_key(self) -> str:
        return _b64(self._public_raw)

    def registered(self, not_after: datetime | None = None) -> RegisteredKey:
        return RegisteredKey(key_id=self.key_id, public_key=self.public_key, not_after=not_after)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def signed_bytes(manifest: UpdateManifest) -> bytes:
    """The canonical bytes a signature covers: the signed fields as sorted, compact JSON."""
    fields = {name: getattr(manifest, name) for name in SIGNED_FIELDS}
    return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(manifest: UpdateManifest, key: SigningKey) -> UpdateManifest:
    """``manifest`` with ``key_id`` and ``signature`` set."""
    unsigned = manifest.model_copy(update={"key_id": key.key_id, "signature": None})
    signature = _b64(key.sign(signed_bytes(unsigned)))
    return unsigned.model_copy(update={"signature": signature})


def verify_manifest(
    manifest: UpdateManifest, keys: Sequence[RegisteredKey], now: datetime | None = None
) -> RegisteredKey:
    """The registered key that signed ``manifest``, or :class:`UpdateRejected`:
    ``unsigned`` (no signature), ``unknown_key`` (its key is not registered for the site,
    or its rotation overlap has ended), ``forged`` (the signature does not verify)."""
    site = manifest.site
    if manifest.signature is None or manifest.key_id is None:
        raise UpdateRejected(
            RejectReason.UNSIGNED,
            f"the update of site {site} is not signed and signatures are required: give the "
            "site its signing key (fedround site init) and register its public key",
        )
    now = now or datetime.now(UTC)
    matching = [key for key in keys if key.key_id == manifest.key_id]
    if not matching:
        raise UpdateRejected(
            RejectReason.UNKNOWN_KEY,
            f"signed with key {manifest.key_id[:16]!r}, which is not registered for site "
            f"{site} (registered: {[key.key_id for key in keys] or 'none'})",
        )
    key = matching[0]
    if key.revoked_at is not None:
        raise UpdateRejected(
            RejectReason.UNKNOWN_KEY,
            f"signed with key {key.key_id}, revoked at {key.revoked_at} "
            f"({key.revoke_reason or 'no reason given'}): the site needs a new key",
        )
    if not key.valid_at(now):
        raise UpdateRejected(
            RejectReason.UNKNOWN_KEY,
            f"signed with key {key.key_id}, retired at {key.not_after}: the site must sign "
            "with its rotated key",
        )
    try:
        signature = _unb64(manifest.signature)
    except (binascii.Error, ValueError) as exc:
        raise UpdateRejected(RejectReason.FORGED, "the signature is not base64") from exc
    if len(signature) != SIGNATURE_BYTES:
        raise UpdateRejected(
            RejectReason.FORGED,
            f"the signature is {len(signature)} bytes, an Ed25519 signature is 64",
        )
    public = Ed25519PublicKey.from_public_bytes(_unb64(key.public_key))
    try:
        public.verify(signature, signed_bytes(manifest))
    except InvalidSignature as exc:
        raise UpdateRejected(
            RejectReason.FORGED,
            f"the signature does not match the manifest under key {key.key_id} of site "
            f"{site}: the manifest was altered or not signed by the site",
        ) from exc
    return key
