"""Secure aggregation's building blocks (tasks/core/secagg): Shamir sharing over
2**521 − 1, the fixed-point encoding and its error bound, and the mask primitives
(golden ChaCha20 keystream, HKDF separation, X25519)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedround.tasks.core.errors import FedroundError
from fedround.tasks.core.secagg import (
    FixedPoint,
    SecAggParameterError,
    combine,
    derive_key,
    expand,
    lagrange_at_zero,
    pairwise_secret,
    split,
)
from fedround.tasks.core.secagg.masks import is_low_order
from fedround.tasks.core.secagg.shamir import PRIME, SHARE_BYTES

# --- Shamir --------------------------------------------------------------------------


def test_any_threshold_shares_recover_the_secret() -> None:
    secret = bytes(range(32))
    shares = split(secret, 3, [1, 2, 3, 4, 5])

    for subset in itertools.combinations(shares, 3):
        assert combine({i: shares[i] for i in subset}, 3, 32) == secret


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    n=st.integers(min_value=2, max_value=9),
    data=st.data(),
)
def test_split_combine_round_trip(secret: bytes, n: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(min_value=1, max_value=n))
    indices = data.draw(st.permutations(range(1, 3 * n)))[:n]
    shares = split(secret, threshold, indices)
    chosen = data.draw(st.permutations(sorted(shares)))[:threshold]

    assert combine({i: shares[i] for i in chosen}, threshold, len(secret)) == secret


def test_shares_are_fixed_width_field_elements() -> None:
    shares = split(b"\x00" * 32, 4, range(1, 8))

    assert all(len(share) == SHARE_BYTES for share in shares.values())
    assert all(int.from_bytes(share, "big") < PRIME for share in shares.values())


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = split(b"secret", 4, [1, 2, 3, 4, 5])

    with pytest.raises(SecAggParameterError, match="needs at least 4 shares, got 3"):
        combine({i: shares[i] for i in (1, 2, 3)}, 4, 6)


def test_threshold_minus_one_shares_fit_any_secret() -> None:
    """Perfect secrecy, by construction: t − 1 shares of secret A together with the point
    (0, B) lie on a polynomial of degree t − 1, whose t-th share combines to B."""
    t = 4
    shares = split(b"A" * 32, t, range(1, 8))
    known = {i: int.from_bytes(shares[i], "big") for i in (1, 2, 3)}
    points = {0: int.from_bytes(b"B" * 32, "big"), **known}
    # The share at index 7 of the polynomial through `points` (Lagrange at 7).
    at_seven = 0
    for i, y in points.items():
        weight = 1
        for j in points:
            if j != i:
                weight = weight * (7 - j) * pow(i - j, -1, PRIME) % PRIME
        at_seven = (at_seven + weight * y) % PRIME
    forged = {**{i: shares[i] for i in known}, 7: at_seven.to_bytes(SHARE_BYTES, "big")}

    assert combine(forged, t, 32) == b"B" * 32
    assert combine({i: shares[i] for i in (1, 2, 3, 7)}, t, 32) == b"A" * 32


def test_lagrange_coefficients_are_reusable() -> None:
    coefficients = lagrange_at_zero([2, 3, 5])
    first, second = split(b"one", 3, [2, 3, 5, 6]), split(b"two", 3, [2, 3, 5, 6])

    assert sum(coefficients) % PRIME == 1  # the constant polynomial 1
    assert combine({i: first[i] for i in (2, 3, 5)}, 3, 3, coefficients) == b"one"
    assert combine({i: second[i] for i in (2, 3, 5)}, 3, 3, coefficients) == b"two"
    with pytest.raises(SecAggParameterError, match="2 Lagrange coefficients"):
        combine({i: first[i] for i in (2, 3, 5)}, 3, 3, coefficients[:2])


def test_seeded_rng_makes_shares_reproducible() -> None:
    first = split(b"k" * 32, 3, [1, 2, 3], rng=random.Random(7))
    second = split(b"k" * 32, 3, [1, 2, 3], rng=random.Random(7))

    assert first == second
    assert split(b"k" * 32, 3, [1, 2, 3]) != first


@pytest.mark.parametrize(
    ("share", "problem"),
    [
        (b"\x01" * 65, "a share is 66 bytes, got 65"),
        (b"\x01" * 67, "a share is 66 bytes, got 67"),
        (PRIME.to_bytes(SHARE_BYTES, "big"), "not an element of the field"),
        (b"\xff" * SHARE_BYTES, "not an element of the field"),
    ],
)
def test_malformed_share_is_rejected(share: bytes, problem: str) -> None:
    shares = split(b"x" * 32, 2, [1, 2, 3])

    with pytest.raises(SecAggParameterError, match=problem):
        combine({1: share, 2: shares[2]}, 2, 32)


def test_shares_of_different_secrets_do_not_combine() -> None:
    first, second = split(b"a" * 32, 2, [1, 2]), split(b"b" * 32, 2, [1, 2])

    with pytest.raises(SecAggParameterError, match="do not combine to a 32-byte secret"):
        combine({1: first[1], 2: second[2]}, 2, 32)


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda: split(b"x" * 65, 2, [1, 2]), "at most 64 bytes"),
        (lambda: split(b"x", 2, [1, 1]), "distinct"),
        (lambda: split(b"x", 2, [0, 1]), "index 0 would be the secret"),
        (lambda: split(b"x", 3, [1, 2]), "needs at least 3 shares"),
        (lambda: split(b"x", 0, [1, 2]), "threshold must be an int >= 1"),
        (lambda: combine({1: b"\x00" * 66}, 1, 65), "length must be between 1 and 64"),
    ],
)
def test_invalid_sharing_parameters_are_refused(call: object, problem: str) -> None:
    with pytest.raises(SecAggParameterError, match=problem):
        call()  # type: ignore[operator]


# --- fixed point ---------------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("n", [1, 7, 50])
def test_decoded_sum_is_within_the_error_bound(bits: int, n: int) -> None:
    fixed = FixedPoint(bits, 2.5, n)
    rng = np.random.default_rng(bits + n)
    values = rng.uniform(-2.5, 2.5, size=(n, 2000))
    values[:, :2] = [2.5, -2.5]  # the extremes: n of them must not wrap
    total = np.zeros(2000, dtype=fixed.dtype)
    for row in values:
        encoded, clipped = fixed.encode(row)
        assert clipped == 0
        total += encoded

    decoded = fixed.decode(total)
    exact = np.array([math.fsum(column) for column in values.T])

    assert np.max(np.abs(decoded - exact)) <= fixed.error_bound()
    assert decoded[0] == pytest.approx(2.5 * n) and decoded[1] == pytest.approx(-2.5 * n)


def test_error_bound_values() -> None:
    assert FixedPoint(32, 1.0, 50).error_bound() == pytest.approx(5.82e-7, rel=1e-2)
    assert FixedPoint(64, 1.0, 50).error_bound() < 1e-13
    assert FixedPoint(64, 1.0, 1).max_magnitude <= 2**63 - 1


def test_clipped_coordinates_are_counted_and_clipped() -> None:
    fixed = FixedPoint(32, 1.0, 3)

    encoded, clipped = fixed.encode(np.array([2.0, -3.0, 0.5, 1.0]))

    assert clipped == 2
    np.testing.assert_allclose(fixed.decode(encoded), [1.0, -1.0, 0.5, 1.0], atol=1e-8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    with pytest.raises(SecAggParameterError, match=r"1 NaN or infinite values .* at index 2"):
        FixedPoint(32, 1.0, 2).encode(np.array([0.0, 0.1, bad]))


@pytest.mark.parametrize(
    ("bits", "value_range", "summands", "problem"),
    [
        (16, 1.0, 2, "bits must be 32 or 64"),
        (32, 0.0, 2, "value_range must be a finite number > 0"),
        (32, math.inf, 2, "value_range must be a finite number > 0"),
        (32, math.nan, 2, "value_range must be a finite number > 0"),
        (32, 1.0, 0, "max_summands must be between 1"),
        (32, 1e-320, 2, "too small"),
    ],
)
def test_invalid_encodings_are_refused(
    bits: int, value_range: float, summands: int, problem: str
) -> None:
    with pytest.raises(SecAggParameterError, match=problem):
        FixedPoint(bits, value_range, summands)


def test_decode_checks_the_dtype() -> None:
    with pytest.raises(SecAggParameterError, match="takes a uint32 array"):
        FixedPoint(32, 1.0, 2).decode(np.zeros(3, dtype=np.uint64))


def test_errors_are_fedround_errors() -> None:
    assert issubclass(SecAggParameterError, FedroundError)


# --- masks ---------------------------------------------------------------------------


def test_expand_is_the_chacha20_keystream() -> None:
    # RFC 8439 A.1, test vector 1: all-zero key, nonce and counter.
    stream = expand(bytes(32), 4, np.uint32)

    assert stream.dtype == np.uint32
    assert [int(v) for v in stream] == [0xADE0B876, 0x903DF1A0, 0xE56A5D40, 0x28BD8653]
    assert int(expand(bytes(32), 1, np.uint64)[0]) == 0x903DF1A0ADE0B876


def test_expand_checks_its_inputs() -> None:
    with pytest.raises(SecAggParameterError, match="uint32 or uint64"):
        expand(bytes(32), 4, np.int32)
    with pytest.raises(SecAggParameterError, match="32 bytes, got 16"):
        expand(bytes(16), 4, np.uint32)


def test_derived_keys_are_separated_by_purpose_and_context() -> None:
    keys = {
        derive_key(b"s" * 32, purpose, context)
        for purpose in ("self-mask", "pair-mask")
        for context in (b"round-1", b"round-2")
    }

    assert len(keys) == 4
    assert all(len(key) == 32 for key in keys)
    assert derive_key(b"s" * 32, "self-mask", b"round-1") == derive_key(
        b"s" * 32, "self-mask", b"round-1"
    )


def test_pairwise_secret_is_symmetric_and_refuses_low_order_keys() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()

    assert pairwise_secret(a, b.public_key().public_bytes_raw()) == pairwise_secret(
        b, a.public_key().public_bytes_raw()
    )
    with pytest.raises(SecAggParameterError, match="low order"):
        pairwise_secret(a, bytes(32))
    with pytest.raises(SecAggParameterError, match="32 bytes, got 31"):
        pairwise_secret(a, bytes(31))


def test_low_order_keys_are_recognised_as_x25519_refuses_them() -> None:
    p = 2**255 - 19
    orders = [0, 1, p - 1, p, p + 1]
    orders += [
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
    ]
    own = X25519PrivateKey.generate()

    for u in orders + [v + 2**255 for v in orders if v + 2**255 < 2**256]:
        key = u.to_bytes(32, "little")
        assert is_low_order(key)
        with pytest.raises(SecAggParameterError, match="low order"):
            pairwise_secret(own, key)
    for _ in range(20):
        assert not is_low_order(X25519PrivateKey.generate().public_key().public_bytes_raw())
