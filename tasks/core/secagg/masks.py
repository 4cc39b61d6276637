"""Masks: key agreement, key derivation and the pseudo-random generator.

Two sites agree on a secret by X25519 (:func:`pairwise_secret`), every key is derived
from a secret with HKDF-SHA256 bound to a purpose and to the round's context
(:func:`derive_key`, so a key of one round or of one use is useless for another), and a
key expands into a mask vector with the ChaCha20 keystream (:func:`expand`). Each key
expands exactly one mask, so ChaCha20's nonce can stay fixed at zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggParameterError

KEY_BYTES = 32
DOMAIN = b"fedround-secagg-v1/"
_ZERO_NONCE = bytes(16)  # ChaCha20's 16 bytes: block counter and nonce
_P25519 = 2**255 - 19
# The u-coordinates of Curve25519's points of small order (libsodium's blacklist, reduced):
# agreeing a secret with one of them gives a value that anyone can compute.
_LOW_ORDER = frozenset(
    {
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P25519 - 1,
    }
)


def expand(key: bytes, length: int, dtype: npt.DTypeLike) -> npt.NDArray[np.unsignedinteger[Any]]:
    """``length`` pseudo-random ``uint32``/``uint64`` values from a 32-byte key: the
    ChaCha20 keystream read as little-endian integers (the same on every machine). The
    array is read-only."""
    kind = np.dtype(dtype)
    if kind not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise SecAggParameterError(f"masks are uint32 or uint64, got {kind}")
    if len(key) != KEY_BYTES:
        raise SecAggParameterError(f"a mask key is {KEY_BYTES} bytes, got {len(key)}")
    if length < 0:
        raise SecAggParameterError(f"a mask has length >= 0, got {length}")
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(length * kind.itemsize))
    values = np.frombuffer(stream, dtype=kind.newbyteorder("<"))
    return values.astype(kind, copy=False)


def derive_key(secret: bytes, purpose: str, context: bytes) -> bytes:
    """A 32-byte key from ``secret`` for ``purpose`` in ``context`` (HKDF-SHA256; the info
    is the domain, the purpose and the context, so each (purpose, round) gets its own)."""
    if "\x00" in purpose:
        raise SecAggParameterError("a key purpose must not contain NUL")
    info = DOMAIN + purpose.encode() + b"\x00" + context
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def is_low_order(public: bytes) -> bool:
    """Whether a 32-byte X25519 public key is a point of small order, decoded as X25519
    does (top bit ignored, non-canonical values reduced): cheaper than a probe exchange."""
    u = int.from_bytes(public, "little") & ((1 << 255) - 1)
    return u % _P25519 in _LOW_ORDER


def pairwise_secret(own_private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 secret shared with the owner of ``peer_public`` (32 raw bytes).
    :class:`SecAggParameterError` for a key of the wrong size or of low order (whose shared
    secret would be all zeros, known to anyone)."""
    if len(peer_public) != KEY_BYTES:
        raise SecAggParameterError(
            f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}"
        )
    try:
        return own_private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggParameterError(
            "the peer's X25519 public key is of low order: no secret can be agreed with it"
        ) from exc
