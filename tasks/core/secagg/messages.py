"""The messages of secure aggregation, their defensive parsing, and the encryption and
commitments of the shares.

Every message is JSON, bytes as base64. ``parse(raw, site, params)`` turns raw bytes from
``site`` into a checked message or raises :class:`SecAggMessageError` naming the site and
what is wrong (bad JSON or base64, a wrong key length, unknown fields, a ``site`` field
other than the sender). A share ciphertext carries the hash commitments to its two shares
in the clear, as associated data of its AES-GCM encryption: the coordinator keeps them to
check the shares revealed at the last step, and the recipient checks its shares against
them as it decrypts, so a wrong share revealed later is the revealer's doing. (Shares are
uniformly random 521-bit field elements: their hashes reveal nothing practical.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from typing import Any, Literal, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import SecAggMessageError, SecAggParameterError
from .masks import KEY_BYTES, derive_key, is_low_order, pairwise_secret
from .params import RoundParams
from .shamir import PRIME, SHARE_BYTES

ShareKind = Literal["self-mask", "mask-key"]
COORDINATOR = "coordinator"  # the sender named in errors about what a site was sent
SEED_BYTES = 32
COMMITMENT_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# A share ciphertext: commitment to the self-mask share, to the mask-key share, the
# AES-GCM nonce, then both shares encrypted (with the commitments as associated data).
CIPHERTEXT_BYTES = 2 * COMMITMENT_BYTES + NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
ADVERT_MAX_BYTES = 4096
PER_SITE_MAX_BYTES = 1024  # a bundle's or an unmask message's bytes per site, with room
_HEX = frozenset("0123456789abcdef")


def _hash(*parts: bytes) -> bytes:
    """sha256 over length-prefixed parts (no two part lists hash alike)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


def b64(data: bytes) -> str:
    """Standard base64, as text: how bytes travel in the messages."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, size: int, what: str, site: str) -> bytes:
    """Strict base64 of exactly ``size`` bytes, else :class:`SecAggMessageError` naming
    ``site`` and ``what``."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SecAggMessageError(f"site {site}: {what} is not valid base64", site) from None
    if len(data) != size:
        raise SecAggMessageError(f"site {site}: {what} is {len(data)} bytes, expected {size}", site)
    return data


def _is_sha256_hex(text: str) -> bool:
    return len(text) == 64 and set(text) <= _HEX


def validation_summary(exc: ValidationError) -> str:
    """Up to three of pydantic's complaints, field and problem, never the input (it may
    hold keys or shares)."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or 'message'}: {error['msg']}"
        for error in exc.errors(include_input=False, include_url=False)
    ]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def seed_commitment(context: bytes, site: str, seed: bytes) -> str:
    """A site's commitment to its self-mask seed in a round (sha256 hex)."""
    return _hash(b"self-mask-commitment", context, site.encode(), seed).hex()


def share_commitment(context: bytes, owner: str, recipient: str, kind: str, share: bytes) -> bytes:
    """The commitment to ``owner``'s ``kind`` share held by ``recipient`` (sha256)."""
    return _hash(
        b"share-commitment", context, owner.encode(), recipient.encode(), kind.encode(), share
    )


def _associated_data(context: bytes, sender: str, recipient: str, commitments: bytes) -> bytes:
    return _hash(b"share-encryption", context, sender.encode(), recipient.encode(), commitments)


def share_key(own: X25519PrivateKey, peer: KeyAdvert, context: bytes) -> bytes:
    """The AES-256-GCM key between ``own`` and ``peer``'s encryption key, for this round."""
    try:
        secret = pairwise_secret(own, peer.enc_key())
    except SecAggParameterError as exc:
        raise SecAggMessageError(f"site {peer.site}: enc_public: {exc}", peer.site) from None
    return derive_key(secret, "share-encryption", context)


def seal_shares(
    key: bytes, context: bytes, sender: str, recipient: str, self_share: bytes, key_share: bytes
) -> str:
    """The base64 ciphertext of ``sender``'s two shares for ``recipient`` (layout:
    :data:`CIPHERTEXT_BYTES`). The nonce is random: the key of a pair serves both ways."""
    commitments = share_commitment(
        context, sender, recipient, "self-mask", self_share
    ) + share_commitment(context, sender, recipient, "mask-key", key_share)
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(
        nonce, self_share + key_share, _associated_data(context, sender, recipient, commitments)
    )
    return b64(commitments + nonce + sealed)


def open_shares(
    key: bytes, context: bytes, sender: str, recipient: str, text: Any
) -> tuple[bytes, bytes]:
    """(self-mask share, mask-key share) from :func:`seal_shares`'s ciphertext;
    :class:`SecAggMessageError` naming ``sender`` when it is malformed, altered, or its
    shares do not match their commitments."""
    if not isinstance(text, str):
        raise SecAggMessageError(f"site {sender}: the ciphertext is not a string", sender)
    blob = unb64(text, CIPHERTEXT_BYTES, "the ciphertext", sender)
    commitments = blob[: 2 * COMMITMENT_BYTES]
    nonce = blob[2 * COMMITMENT_BYTES : 2 * COMMITMENT_BYTES + NONCE_BYTES]
    try:
        plain = AESGCM(key).decrypt(
            nonce,
            blob[2 * COMMITMENT_BYTES + NONCE_BYTES :],
            _associated_data(context, sender, recipient, commitments),
        )
    except InvalidTag:
        raise SecAggMessageError(
            f"site {sender}: its shares for {recipient} do not decrypt (altered on the way, "
            "or encrypted to other keys)",
            sender,
        ) from None
    self_share, key_share = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
    expected = share_commitment(
        context, sender, recipient, "self-mask", self_share
    ) + share_commitment(context, sender, recipient, "mask-key", key_share)
    if expected != commitments:
        raise SecAggMessageError(
            f"site {sender}: its shares for {recipient} do not match their commitments", sender
        )
    return self_share, key_share


def ciphertext_commitments(text: str) -> tuple[bytes, bytes]:
    """(self-mask, mask-key) share commitments of a ciphertext already checked by
    :meth:`ShareBundle.parse`."""
    blob = base64.b64decode(text)
    return blob[:COMMITMENT_BYTES], blob[COMMITMENT_BYTES : 2 * COMMITMENT_BYTES]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, hide_input_in_errors=True)

    site: str

    @classmethod
    def _load(cls, raw: bytes, site: str, max_bytes: int) -> Self:
        kind = cls.__name__
        if not isinstance(raw, bytes | bytearray):
            raise SecAggMessageError(
                f"site {site}: the {kind} is a {type(raw).__name__}, not bytes", site
            )
        if len(raw) > max_bytes:
            raise SecAggMessageError(
                f"site {site}: the {kind} is {len(raw)} bytes, more than the {max_bytes} it can be",
                site,
            )
        try:
            message = cls.model_validate_json(raw)
        except ValidationError as exc:
            raise SecAggMessageError(
                f"site {site}: the {kind} is not valid: {validation_summary(exc)}", site
            ) from None
        if message.site != site:
            raise SecAggMessageError(
                f"site {site}: the {kind} says it is from site {message.site!r}", site
            )
        return message


class KeyAdvert(_Message):
    """Step 0, a site's public keys of the round (32 raw bytes each, base64) and the
    commitment to its self-mask seed (sha256 hex)."""

    enc_public: str
    mask_public: str
    self_mask_commitment: str

    @classmethod
    def parse(cls, raw: bytes, site: str, params: RoundParams) -> KeyAdvert:
        """The advert ``site`` sent, checked (:meth:`check`); :class:`SecAggMessageError`
        naming the site and the problem otherwise."""
        advert = cls._load(raw, site, ADVERT_MAX_BYTES)
        advert.check(params)
        return advert

    def check(self, params: RoundParams) -> None:
        """Everything but the JSON shape: a site of the round, two distinct X25519 keys of
        full order (a low-order key agrees an all-zero secret), a sha256 hex commitment."""
        if self.site not in params.sites:
            raise SecAggMessageError(f"site {self.site}: not one of the round's sites", self.site)
        enc, mask = self.enc_key(), self.mask_key()
        if enc == mask:
            raise SecAggMessageError(
                f"site {self.site}: the encryption and mask keys are the same key", self.site
            )
        for name, key in (("enc_public", enc), ("mask_public", mask)):
            if is_low_order(key):
                raise SecAggMessageError(
                    f"site {self.site}: {name} is an X25519 key of low order (its shared "
                    "secrets would be known to anyone)",
                    self.site,
                )
        if not _is_sha256_hex(self.self_mask_commitment):
            raise SecAggMessageError(
                f"site {self.site}: self_mask_commitment is not a sha256 hex digest", self.site
            )

    def enc_key(self) -> bytes:
        return unb64(self.enc_public, KEY_BYTES, "enc_public", self.site)

    def mask_key(self) -> bytes:
        return unb64(self.mask_public, KEY_BYTES, "mask_public", self.site)


class ShareBundle(_Message):
    """Step 1, a site's shares for every site of the roster, itself included: recipient →
    base64 of (commitment to the self-mask share ‖ commitment to the mask-key share ‖
    AES-GCM nonce ‖ both shares encrypted to the recipient). The commitments are
    associated data of the encryption, so the coordinator cannot alter them unseen, and
    the recipient checks its shares against them: a share revealed later that does not
    match its commitment was altered by the revealer."""

    ciphertexts: dict[str, str]

    @classmethod
    def parse(cls, raw: bytes, site: str, params: RoundParams) -> ShareBundle:
        """The bundle ``site`` sent: recipients of the round, ciphertexts of the right
        size. Whether it addresses exactly the roster is the coordinator's check."""
        bundle = cls._load(raw, site, PER_SITE_MAX_BYTES * (len(params.sites) + 4))
        for recipient, text in bundle.ciphertexts.items():
            if recipient not in params.sites:
                raise SecAggMessageError(
                    f"site {site}: shares addressed to {recipient!r}, not a site of the round",
                    site,
                )
            unb64(text, CIPHERTEXT_BYTES, f"the ciphertext for {recipient}", site)
        return bundle


class UnmaskShares(_Message):
    """Step 3, a survivor's revealed shares: owner → base64 share (66 bytes) of the owner's
    self-mask seed (survivors) or mask key (dropped sites). ``unavailable``: owners whose
    shares this site never got intact (missing, undecryptable, or not matching their
    commitments), so it cannot reveal them."""

    self_mask_shares: dict[str, str]
    mask_key_shares: dict[str, str]
    unavailable: list[str] = Field(default_factory=list)

    @classmethod
    def parse(cls, raw: bytes, site: str, params: RoundParams) -> UnmaskShares:
        """The reveal ``site`` sent: no owner twice (never both shares of one), owners of
        the round, shares that are field elements. Whether they match their commitments
        is the coordinator's check."""
        message = cls._load(raw, site, PER_SITE_MAX_BYTES * (len(params.sites) + 4))
        both = message.self_mask_shares.keys() & message.mask_key_shares.keys()
        if both:
            raise SecAggMessageError(
                f"site {site}: reveals both shares of {sorted(both)} (never allowed)", site
            )
        owners = [*message.self_mask_shares, *message.mask_key_shares, *message.unavailable]
        if len(set(owners)) != len(owners):
            raise SecAggMessageError(
                f"site {site}: an owner is listed twice (revealed and unavailable)", site
            )
        for owner in owners:
            if owner not in params.sites:
                raise SecAggMessageError(
                    f"site {site}: reveals shares of {owner!r}, not a site of the round", site
                )
        for kind, shares in (
            ("self-mask", message.self_mask_shares),
            ("mask-key", message.mask_key_shares),
        ):
            for owner, text in shares.items():
                share = unb64(text, SHARE_BYTES, f"the {kind} share of {owner}", site)
                if int.from_bytes(share, "big") >= PRIME:
                    raise SecAggMessageError(
                        f"site {site}: the {kind} share of {owner} is not a field element", site
                    )
        return message

    def shares(self, kind: ShareKind) -> dict[str, str]:
        """Owner → base64 share of ``kind``."""
        return self.self_mask_shares if kind == "self-mask" else self.mask_key_shares

    def share(self, kind: ShareKind, owner: str) -> bytes:
        """The (already checked) share of ``kind`` revealed for ``owner``."""
        return base64.b64decode(self.shares(kind)[owner])
