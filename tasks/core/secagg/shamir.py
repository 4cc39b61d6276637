"""Shamir secret sharing over the prime field p = 2**521 − 1.

A secret s (at most 64 bytes, read as a big-endian integer < 2**512 < p) is the constant
term of a polynomial f of degree t − 1 with uniformly random other coefficients; the
share of index i ≥ 1 is f(i), written as 66 fixed-width big-endian bytes. Any t shares
give f(0) = Σ λᵢ·f(i) with the Lagrange coefficients λᵢ = Π_{j≠i} j/(j − i) at 0; any
t − 1 shares are uniformly distributed whatever the secret (they say nothing about it).

p is a Mersenne prime, so 32-byte keys fit in one field element and arithmetic is Python's
own big integers. We deliberately do not use pycryptodome's ``Shamir`` (GF(2**128),
16-byte secrets only, measured 36 ms per combine at t=26, i.e. 1.8 s per round at 50
sites): in a round every secret is combined from the same surviving index set, so the
coefficients are computed once (:func:`lagrange_at_zero`, cached) and each combine is t
multiplications.
"""

from __future__ import annotations

import random
import secrets as _secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

from .errors import SecAggParameterError

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ⌈521/8⌉
MAX_SECRET_BYTES = 64


def _check_indices(indices: Sequence[int]) -> tuple[int, ...]:
    checked = tuple(indices)
    for index in checked:
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index < PRIME:
            raise SecAggParameterError(
                f"share index {index!r} is not an integer between 1 and 2**521 − 2 "
                "(index 0 would be the secret itself)"
            )
    if len(set(checked)) != len(checked):
        raise SecAggParameterError(f"share indices must be distinct, got {sorted(checked)}")
    return checked


def _check_threshold(threshold: int, available: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise SecAggParameterError(f"threshold must be an int >= 1, got {threshold!r}")
    if threshold > available:
        raise SecAggParameterError(
            f"threshold {threshold} needs at least {threshold} shares, got {available}"
        )


def split(
    secret: bytes,
    threshold: int,
    indices: Sequence[int],
    rng: random.Random | None = None,
) -> dict[int, bytes]:
    """Shares of ``secret`` for each of ``indices`` (index → 66 bytes), any ``threshold``
    of which recover it. ``rng`` draws the polynomial (default: the OS's CSPRNG; pass a
    seeded ``random.Random`` only in tests)."""
    if not isinstance(secret, bytes | bytearray) or len(secret) > MAX_SECRET_BYTES:
        raise SecAggParameterError(
            f"a secret is at most {MAX_SECRET_BYTES} bytes, got "
            f"{len(secret) if isinstance(secret, bytes | bytearray) else type(secret).__name__}"
        )
    points = _check_indices(indices)
    _check_threshold(threshold, len(points))
    draw = _secrets.randbelow if rng is None else (lambda n: rng.randrange(n))
    coefficients = [int.from_bytes(secret, "big")] + [draw(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for x in points:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


@lru_cache(maxsize=256)
def _lagrange(points: tuple[int, ...]) -> tuple[int, ...]:
    coefficients = []
    for i in points:
        numerator, denominator = 1, 1
        for j in points:
            if j != i:
                numerator = numerator * j % PRIME
                denominator = denominator * (j - i) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(coefficients)


def lagrange_at_zero(indices: Sequence[int]) -> list[int]:
    """The Lagrange coefficients at 0 for ``indices``, in their order (cached per set:
    a round reuses them for every secret combined from the same shares)."""
    return list(_lagrange(_check_indices(indices)))


def share_value(share: bytes) -> int:
    """A share's field element; :class:`SecAggParameterError` unless it is 66 bytes < p."""
    if not isinstance(share, bytes | bytearray) or len(share) != SHARE_BYTES:
        size = len(share) if isinstance(share, bytes | bytearray) else type(share).__name__
        raise SecAggParameterError(f"a share is {SHARE_BYTES} bytes, got {size}")
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise SecAggParameterError("a share is not an element of the field (>= 2**521 − 1)")
    return value


def combine(
    shares: Mapping[int, bytes],
    threshold: int,
    length: int,
    coefficients: Sequence[int] | None = None,
) -> bytes:
    """The ``length``-byte secret from the ``threshold`` shares of smallest index.

    ``coefficients``, when given, must be ``lagrange_at_zero(sorted(shares)[:threshold])``
    (by default they come from that function's cache). Too few or malformed shares raise
    :class:`SecAggParameterError`, and so do shares that do not combine to a
    ``length``-byte value (shares of different secrets, or altered ones: that happens by
    chance with probability 2**(8·length − 521))."""
    if not 1 <= length <= MAX_SECRET_BYTES:
        raise SecAggParameterError(
            f"length must be between 1 and {MAX_SECRET_BYTES} bytes, got {length}"
        )
    _check_threshold(threshold, len(shares))
    points = _check_indices(sorted(shares)[:threshold])
    weights = _lagrange(points) if coefficients is None else tuple(coefficients)
    if len(weights) != threshold:
        raise SecAggParameterError(
            f"{len(weights)} Lagrange coefficients for threshold {threshold}: compute them "
            "with lagrange_at_zero(sorted(shares)[:threshold])"
        )
    secret = sum(w * share_value(shares[x]) for w, x in zip(weights, points, strict=True))
    secret %= PRIME
    if secret >> (8 * length):
        raise SecAggParameterError(
            f"the shares do not combine to a {length}-byte secret: they are not shares of "
            "one secret (altered, or from different polynomials)"
        )
    return secret.to_bytes(length, "big")
