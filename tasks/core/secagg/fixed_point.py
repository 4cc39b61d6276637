"""Fixed-point encoding of float updates as integers modulo 2**bits.

Masks only cancel in a finite group, so each coordinate x is clipped to [−R, R] and
encoded as the integer v = round(x·s) in two's complement modulo 2**bits (numpy
``uint32``/``uint64``, whose arithmetic wraps). The scale s is chosen so that the sum of
up to n encodings never leaves the signed range: |v| ≤ q = ⌊(2**(bits−1) − 1)/n⌋ and
s = q/R, so |Σv| ≤ n·q < 2**(bits−1) and the sum decodes exactly as a signed integer.

Error per coordinate of a decoded sum of n unclipped values: at most half a grid step per
summand, n/(2s), plus a few float64 roundings of the sum's magnitude n·R
(:meth:`FixedPoint.error_bound`). At bits=32, n=50, R=1 that is 5.8e-7; at bits=64 the
float64 term dominates (≈ n·R·1e-15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import SecAggParameterError

UIntArray = npt.NDArray[np.unsignedinteger[Any]]
FloatArray = npt.NDArray[np.float64]

_FLOAT_SLACK = 2.0**-50  # 8 float64 ulps of n·R: roundings in encode and decode, with room


@dataclass(frozen=True)
class FixedPoint:
    """Encoding of floats in [−``value_range``, ``value_range``] as integers modulo
    2**``bits``, such that the sum of ``max_summands`` encodings does not wrap."""

    bits: int
    value_range: float
    max_summands: int

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (32, 64):
            raise SecAggParameterError(f"bits must be 32 or 64, got {self.bits!r}")
        if isinstance(self.max_summands, bool) or not isinstance(self.max_summands, int):
            raise SecAggParameterError(
                f"max_summands must be an int, got {type(self.max_summands).__name__}"
            )
        if not 1 <= self.max_summands <= 2 ** (self.bits - 2):
            raise SecAggParameterError(
                f"max_summands must be between 1 and 2**{self.bits - 2}, got {self.max_summands}"
            )
        value_range = float(self.value_range)
        if not value_range > 0 or not math.isfinite(value_range):
            raise SecAggParameterError(
                f"value_range must be a finite number > 0, got {self.value_range!r}"
            )
        if not math.isfinite(self.max_magnitude / value_range):
            raise SecAggParameterError(
                f"value_range {value_range!r} is too small: the scale overflows; use a "
                "value_range of at least 1e-290"
            )

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger[Any]]:
        """``uint32`` or ``uint64``: the field's elements."""
        return np.dtype(np.uint32) if self.bits == 32 else np.dtype(np.uint64)

    @property
    def max_magnitude(self) -> int:
        """q: the largest |v| of one encoded value, ⌊(2**(bits−1) − 1)/n⌋, rounded down to
        a float64 so that clipping in float64 never exceeds it."""
        q = (2 ** (self.bits - 1) - 1) // self.max_summands
        as_float = float(q)
        while int(as_float) > q:  # float(q) may round up (bits=64): step down to below q
            as_float = math.nextafter(as_float, 0.0)
        return int(as_float)

    @property
    def scale(self) -> float:
        """s = q/R: encoded integers per unit of value."""
        return self.max_magnitude / float(self.value_range)

    def encode(self, x: npt.ArrayLike) -> tuple[UIntArray, int]:
        """(``x`` clipped to [−R, R], rounded to the grid, in two's complement mod 2**bits;
        how many coordinates were clipped). A NaN or infinite value is refused: it would
        encode to garbage that no check after masking can see."""
        values = np.asarray(x, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(values.size - np.count_nonzero(finite))
            first = int(np.flatnonzero(~finite.reshape(-1))[0])
            raise SecAggParameterError(
                f"the update has {bad} NaN or infinite values (the first at index {first}): "
                "it cannot be encoded; fix the training that produced it"
            )
        limit = float(self.value_range)
        clipped = int(np.count_nonzero(np.abs(values) > limit))
        q = float(self.max_magnitude)
        grid = np.rint(np.clip(values, -limit, limit) * self.scale)
        signed = np.clip(grid, -q, q).astype(np.int64)
        if self.bits == 64:
            return signed.view(np.uint64), clipped
        return (signed & 0xFFFFFFFF).astype(np.uint32), clipped

    def decode(self, total: npt.NDArray[Any]) -> FloatArray:
        """The float64 value of ``total``, a sum (mod 2**bits) of at most ``max_summands``
        encodings: read as a signed integer, divided by the scale."""
        array = np.asarray(total)
        if array.dtype != self.dtype:
            raise SecAggParameterError(
                f"decode takes a {self.dtype} array (bits={self.bits}), got {array.dtype}"
            )
        signed = array.view(np.int32 if self.bits == 32 else np.int64)
        return signed.astype(np.float64) / self.scale

    def error_bound(self) -> float:
        """The largest |decoded − exact| per coordinate of a sum of ``max_summands``
        encodings of values within [−R, R]: n/(2s) from rounding to the grid, plus
        8 float64 ulps of n·R for the roundings of x·s and of the decoded sum."""
        n = self.max_summands
        return n / (2.0 * self.scale) + n * float(self.value_range) * _FLOAT_SLACK
