"""Compressed updates: 8-bit stochastic quantization and top-k sparsification, composable.

- **8-bit stochastic quantization** (``q8``), after QSGD (Alistarh et al., "QSGD:
  Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017): each
  tensor is mapped onto 256 evenly spaced levels between its minimum and maximum, and every
  value is rounded up or down at random with the probability that makes the expected value
  exact, so the coordinator's mean stays unbiased.
- **Top-k sparsification** (``topk``) with error feedback (Stich, Cordonnier and Jaggi,
  "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et al., "Error Feedback Fixes
  SignSGD and other Gradient Compression Schemes", ICML 2019): each floating tensor sends
  only its ``ceil(ratio × numel)`` entries of largest magnitude; what was not sent (the
  *residual*) stays at the site and is added to its next update, so nothing is lost, only
  delayed. Positions travel as sorted ``int32`` indices or as a bitmap, whichever is smaller.
- ``topk+q8``: the kept values are quantized too.

An encoded update is a plain dict of tensors (safetensors-safe: no pickle, no code) plus the
encoding's name, which the site writes in its manifest. Each tensor ``N`` of the model
becomes named parts ``N::q`` (uint8 levels), ``N::scale`` (float32 ``[low, step]``),
``N::values`` (kept values), ``N::idx`` (int32 positions) or ``N::mask`` (packed bits);
tensors that are not floating point travel unchanged under their own name. ``dense`` is
the model's tensors as they are (the format of every update before compression existed).

:func:`decode_update` trusts nothing: unknown encodings, missing or extra parts, wrong
dtypes or shapes, out-of-range or unsorted indices, a bitmap whose count does not match
its values, non-finite or negative scales are each rejected with a reason
(:class:`~.errors.UpdateRejected`); the decoded dense update then goes through the usual
checks (shapes, finiteness, norm) in :mod:`.validation`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import RejectReason, UpdateRejected
from .serialization import Weights

DENSE = "dense"
ENCODINGS = (DENSE, "q8", "topk", "topk+q8")
SEP = "::"
LEVELS = 255  # 8 bits: levels 0..255

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class TensorShape(Protocol):
    """What decoding needs to know of each tensor (``validation.TensorSpec`` has it)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str: ...


@dataclass(frozen=True)
class Encoded:
    """An encoded update: the tensors to serialize and the encoding's name (for the
    manifest); ``dense_nbytes`` is what the same update takes uncompressed."""

    tensors: Weights
    encoding: str
    dense_nbytes: int


def encoding_name(topk_ratio: float | None = None, quantize_bits: int | None = None) -> str:
    """``dense``, ``q8``, ``topk`` or ``topk+q8``; refuses settings it cannot encode."""
    if quantize_bits not in (None, 8):
        raise ValueError(f"quantize_bits must be 8 or None, got {quantize_bits}")
    if topk_ratio is not None and not 0 < topk_ratio <= 1:
        raise ValueError(f"topk_ratio must be in (0, 1], got {topk_ratio}")
    parts = (["topk"] if topk_ratio is not None else []) + (["q8"] if quantize_bits else [])
    return "+".join(parts) or DENSE


def dense_nbytes(weights: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data, uncompressed."""
    return sum(t.numel() * t.element_size() for t in weights.values())


def _compressible(dtype: torch.dtype | str) -> bool:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.int64)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


# --- the pieces -------------------------------------------------------------------------


def quantize(values: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased 8-bit stochastic quantization: (uint8 levels shaped like ``values``,
    float32 ``[low, step]``) with ``E[low + level × step] = value`` for every entry."""
    flat = values.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        return torch.zeros(values.shape, dtype=torch.uint8), torch.zeros(2)
    low64, high64 = float(flat.min()), float(flat.max())
    low = torch.tensor(low64, dtype=torch.float32)
    if float(low) > low64:  # round the float32 grid's bottom down, never above the minimum
        low = torch.nextafter(low, torch.tensor(-math.inf))
    step = torch.tensor((high64 - float(low)) / LEVELS, dtype=torch.float32)
    if float(step) * LEVELS < high64 - float(low):  # and its top up
        step = torch.nextafter(step, torch.tensor(math.inf))
    if float(step) == 0.0:
        levels = torch.zeros_like(flat)
    else:
        scaled = (flat - float(low)) / float(step)
        floor = scaled.floor()
        noise = torch.rand(flat.shape, generator=generator, dtype=torch.float64)
        levels = floor + (noise < scaled - floor).to(torch.float64)
    q = levels.clamp_(0, LEVELS).to(torch.uint8).reshape(values.shape)
    return q, torch.stack([low, step])


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``low + level × step`` in float32."""
    return scale[0] + q.to(torch.float32) * scale[1]


def topk_count(numel: int, ratio: float) -> int:
    """Entries a tensor of ``numel`` keeps at ``ratio``: ``ceil(ratio × numel)``, at least 1."""
    return min(numel, max(1, math.ceil(ratio * numel - 1e-9)))


def topk_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the ``k`` entries of largest magnitude (ties: lower position)."""
    if k >= flat.numel():
        return torch.arange(flat.numel())
    # A stable descending sort makes ties deterministic whatever the platform.
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def pack_mask(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """A bitmap of ``numel`` bits (most significant bit first), set at ``indices``."""
    bits = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.uint8)
    bits[indices] = 1
    return (bits.reshape(-1, 8) * _BITS).sum(dim=1).to(torch.uint8)


def unpack_mask(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """The bitmap's bits as a bool tensor of ``len(mask) × 8`` entries."""
    return (mask.reshape(-1, 1) & _BITS).ne(0).reshape(-1)


# --- encoding ---------------------------------------------------------------------------


def encode_update(
    delta: Mapping[str, torch.Tensor],
    topk_ratio: float | None = None,
    quantize_bits: int | None = None,
    seed: int = 0,
) -> Encoded:
    """Encode an update (top-k, then 8-bit quantization of what is kept; either alone).

    ``seed`` drives the stochastic rounding: the same update and seed give the same bytes.
    """
    encoding = encoding_name(topk_ratio, quantize_bits)
    size = dense_nbytes(delta)
    if encoding == DENSE:
        return Encoded({name: t.detach() for name, t in delta.items()}, DENSE, size)
    generator = torch.Generator().manual_seed(seed)
    out: Weights = {}
    for name in sorted(delta):
        tensor = delta[name].detach().cpu()
        if not _compressible(tensor.dtype):
            out[name] = tensor
            continue
        values = tensor.reshape(-1)
        if topk_ratio is not None:
            k = topk_count(values.numel(), topk_ratio)
            indices = topk_indices(values, k)
            values = values[indices]
            if math.ceil(tensor.numel() / 8) < 4 * k:
                out[name + SEP + "mask"] = pack_mask(indices, tensor.numel())
            else:
                out[name + SEP + "idx"] = indices.to(torch.int32)
        else:
            values = tensor
        if quantize_bits:
            out[name + SEP + "q"], out[name + SEP + "scale"] = quantize(values, generator)
        else:
            out[name + SEP + "values"] = values.contiguous()
    return Encoded(out, encoding, size)


# --- decoding ---------------------------------------------------------------------------


def _bad(detail: str) -> UpdateRejected:
    return UpdateRejected(RejectReason.BAD_ENCODING, detail)


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _expect(name: str, tensor: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> None:
    if _dtype(tensor) != dtype:
        raise UpdateRejected(
            RejectReason.WRONG_DTYPE, f"{name!r} has dtype {_dtype(tensor)}, expected {dtype}"
        )
    if tuple(tensor.shape) != shape:
        raise UpdateRejected(
            RejectReason.WRONG_SHAPE,
            f"{name!r} has shape {tuple(tensor.shape)}, expected {shape}",
        )


def _scale(name: str, tensor: torch.Tensor) -> torch.Tensor:
    _expect(name, tensor, "float32", (2,))
    if not bool(torch.isfinite(tensor).all()):
        raise UpdateRejected(RejectReason.NOT_FINITE, f"{name!r} has a NaN/inf scale")
    if float(tensor[1]) < 0:
        raise _bad(f"{name!r} has a negative step {float(tensor[1])}")
    return tensor


def _positions(name: str, parts: Mapping[str, torch.Tensor], numel: int) -> torch.Tensor:
    """The sorted positions of a sparse tensor's kept entries, checked."""
    if SEP + "idx" in parts:
        key = name + SEP + "idx"
        indices = parts[SEP + "idx"]
        if _dtype(indices) != "int32":
            raise UpdateRejected(
                RejectReason.WRONG_DTYPE, f"{key!r} has dtype {_dtype(indices)}, expected int32"
            )
        if indices.dim() != 1 or not 1 <= indices.numel() <= numel:
            raise UpdateRejected(
                RejectReason.WRONG_SHAPE,
                f"{key!r} has shape {tuple(indices.shape)}: expected 1 to {numel} positions",
            )
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= numel:
            raise _bad(f"{key!r} has positions in [{low}, {high}], outside [0, {numel - 1}]")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise _bad(f"{key!r} positions are not strictly increasing (repeated or unsorted)")
        return indices.to(torch.int64)
    key = name + SEP + "mask"
    mask = parts[SEP + "mask"]
    _expect(key, mask, "uint8", (math.ceil(numel / 8),))
    bits = unpack_mask(mask, numel)
    if bool(bits[numel:].any()):
        raise _bad(f"{key!r} sets bits past the tensor's {numel} entries")
    positions = bits[:numel].nonzero().reshape(-1)
    if positions.numel() == 0:
        raise _bad(f"{key!r} sets no bits")
    return positions


def _decode_one(
    name: str, parts: Mapping[str, torch.Tensor], spec: TensorShape, encoding: str
) -> torch.Tensor:
    shape, numel = tuple(spec.shape), math.prod(spec.shape)
    sparse = encoding.startswith("topk")
    quantized = encoding.endswith("q8")
    wanted = {SEP + "q", SEP + "scale"} if quantized else {SEP + "values"}
    if sparse:
        place = {SEP + "idx"} if SEP + "idx" in parts else {SEP + "mask"}
        wanted |= place
    if set(parts) != wanted:
        raise UpdateRejected(
            RejectReason.WRONG_KEYS,
            f"tensor {name!r} under encoding {encoding} needs parts {sorted(wanted)}, "
            f"got {sorted(parts)}",
        )
    positions = _positions(name, parts, numel) if sparse else None
    count = numel if positions is None else positions.numel()
    kept_shape = shape if positions is None else (count,)
    if quantized:
        _expect(name + SEP + "q", parts[SEP + "q"], "uint8", kept_shape)
        values = dequantize(parts[SEP + "q"], _scale(name + SEP + "scale", parts[SEP + "scale"]))
        values = values.to(getattr(torch, spec.dtype))
    else:
        values = parts[SEP + "values"]
        _expect(name + SEP + "values", values, spec.dtype, kept_shape)
    if positions is None:
        return values.reshape(shape)
    dense = torch.zeros(numel, dtype=getattr(torch, spec.dtype))
    dense[positions] = values
    return dense.reshape(shape)


def decode_update(
    tensors: Mapping[str, torch.Tensor], encoding: str, specs: Mapping[str, TensorShape]
) -> Weights:
    """The dense update an encoded one stands for, shaped and typed as ``specs``; raises
    :class:`UpdateRejected` naming what does not fit. ``dense`` passes through unchanged
    (its keys, shapes and dtypes are checked by the caller)."""
    if encoding not in ENCODINGS:
        raise _bad(f"unknown encoding {encoding!r}; this coordinator decodes {list(ENCODINGS)}")
    if encoding == DENSE:
        return dict(tensors)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    plain: Weights = {}
    for key, tensor in tensors.items():
        base, sep, part = key.rpartition(SEP)
        if sep and part in ("q", "scale", "values", "idx", "mask"):
            grouped.setdefault(base, {})[SEP + part] = tensor
        else:
            plain[key] = tensor
    out: Weights = {}
    for name, spec in specs.items():
        if _compressible(spec.dtype) and name in grouped:
            out[name] = _decode_one(name, grouped.pop(name), spec, encoding)
        elif name in plain:
            out[name] = plain.pop(name)
    extra = sorted(plain) + sorted(f"{n}{SEP}{p}" for n, g in grouped.items() for p in g)
    missing = sorted(set(specs) - set(out))
    if missing or extra:
        raise UpdateRejected(
            RejectReason.WRONG_KEYS,
            f"encoded update lacks tensors {missing}, has unexpected parts {extra[:10]}",
        )
    return out


# --- error feedback ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]
    dtype: str


def shapes_of(weights: Mapping[str, torch.Tensor]) -> dict[str, TensorShape]:
    return {name: _Shape(tuple(t.shape), _dtype(t)) for name, t in weights.items()}


def residual_fits(residual: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> bool:
    """Whether a saved residual belongs to this model (same names, shapes and dtypes)."""
    return set(residual) == set(delta) and all(
        residual[n].shape == delta[n].shape and residual[n].dtype == delta[n].dtype for n in delta
    )


def encode_with_feedback(
    delta: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
    topk_ratio: float | None = None,
    quantize_bits: int | None = None,
    seed: int = 0,
) -> tuple[Encoded, Weights]:
    """Add last round's residual to ``delta``, encode the sum, and return the encoded update
    with the new residual: the sum minus what the coordinator will decode, so
    ``decoded + new residual = delta + residual`` (exactly for top-k alone; for quantized
    values up to float32 rounding). A residual that does not fit the model is ignored."""
    if residual is not None and residual_fits(residual, delta):
        corrected = {n: delta[n] + residual[n] for n in delta}
    else:
        corrected = dict(delta)
    encoded = encode_update(corrected, topk_ratio, quantize_bits, seed)
    sent = decode_update(encoded.tensors, encoded.encoding, shapes_of(corrected))
    return encoded, {n: corrected[n] - sent[n] for n in corrected}
