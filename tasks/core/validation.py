"""Update validation: every check an update must pass before it is aggregated.

Checks run cheapest first, and the first failure rejects the update with a stable
reason code (:class:`RejectReason`) and a message that names what was wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .compression import decode_update
from .errors import RejectReason, UpdateRejected
from .manifest import UpdateManifest
from .serialization import Weights, sha256_hex, weights_from_bytes
from .signing import RegisteredKey, verify_manifest
from .strategies.scaffold import CONTROL_PREFIX, control_key, control_names


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype an update tensor must have."""

    shape: tuple[int, ...]
    dtype: str


def tensor_specs(
    weights: Mapping[str, torch.Tensor], control: bool = False
) -> dict[str, TensorSpec]:
    """The specs of a reference model, against which updates are checked; with
    ``control`` (SCAFFOLD runs) also a ``control/<name>`` tensor for each floating-point
    one, of the same shape and dtype (the site's control-variate delta)."""
    specs = {
        name: TensorSpec(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for name, tensor in weights.items()
    }
    if control:
        specs.update({control_key(name): specs[name] for name in control_names(weights)})
    return specs


@dataclass(frozen=True)
class UpdateExpectation:
    """What the coordinator expects from one site in one round."""

    federation: str
    run_id: str
    round: int
    nonce: str
    site: str
    specs: Mapping[str, TensorSpec]
    max_bytes: int
    max_num_examples: int
    max_norm: float | None = None
    # The site's registered public keys when signatures are required (an empty tuple: none
    # registered, every update rejected); None: signatures are not checked.
    signing_keys: tuple[RegisteredKey, ...] | None = None


def _reject(reason: RejectReason, detail: str) -> UpdateRejected:
    return UpdateRejected(reason, detail)


def check_signature(manifest: UpdateManifest, expected: UpdateExpectation) -> None:
    """The manifest is signed by one of the site's registered keys (when required): run
    first, before the manifest's fields are trusted or its payload is read."""
    if expected.signing_keys is not None:
        verify_manifest(manifest, expected.signing_keys)


def check_manifest(manifest: UpdateManifest, expected: UpdateExpectation) -> None:
    """Run, round, nonce and site of the manifest must match the open round."""
    if manifest.federation != expected.federation or manifest.run_id != expected.run_id:
        raise _reject(
            RejectReason.WRONG_RUN,
            f"update is for {manifest.federation}/{manifest.run_id}, "
            f"expected {expected.federation}/{expected.run_id}",
        )
    if manifest.round != expected.round or manifest.nonce != expected.nonce:
        raise _reject(
            RejectReason.WRONG_ROUND,
            f"update is for round {manifest.round} (nonce {manifest.nonce[:8]}), the open round "
            f"is {expected.round} (nonce {expected.nonce[:8]}): it arrived after its round closed",
        )
    if manifest.site != expected.site:
        raise _reject(
            RejectReason.WRONG_SITE,
            f"update claims site {manifest.site!r} but was uploaded for {expected.site!r}",
        )
    if not 1 <= manifest.num_examples <= expected.max_num_examples:
        raise _reject(
            RejectReason.BAD_EXAMPLE_COUNT,
            f"num_examples={manifest.num_examples} is outside [1, {expected.max_num_examples}]",
        )


def check_tensors(weights: Mapping[str, torch.Tensor], expected: UpdateExpectation) -> None:
    """Keys, shapes, dtypes, finiteness and (optionally) the global L2 norm."""
    missing = sorted(set(expected.specs) - set(weights))
    extra = sorted(set(weights) - set(expected.specs))
    if missing or extra:
        hint = (
            " (control variates belong to SCAFFOLD runs only)"
            if any(name.startswith(CONTROL_PREFIX) for name in extra)
            else ""
        )
        raise _reject(
            RejectReason.WRONG_KEYS, f"missing tensors {missing}, unexpected {extra}{hint}"
        )
    squared_norm = 0.0
    for name, spec in expected.specs.items():
        tensor = weights[name]
        if tuple(tensor.shape) != spec.shape:
            raise _reject(
                RejectReason.WRONG_SHAPE,
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {spec.shape}",
            )
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != spec.dtype:
            raise _reject(
                RejectReason.WRONG_DTYPE,
                f"tensor {name!r} has dtype {dtype}, expected {spec.dtype}",
            )
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise _reject(RejectReason.NOT_FINITE, f"tensor {name!r} has {bad} NaN/inf values")
        if expected.max_norm is not None and not name.startswith(CONTROL_PREFIX):
            squared_norm += float(tensor.double().pow(2).sum())
    if expected.max_norm is not None and math.sqrt(squared_norm) > expected.max_norm:
        raise _reject(
            RejectReason.NORM_TOO_LARGE,
            f"update L2 norm {math.sqrt(squared_norm):.4g} exceeds the bound {expected.max_norm}",
        )


def validate_update(
    manifest: UpdateManifest, payload: bytes, expected: UpdateExpectation
) -> Weights:
    """Validate an uploaded update and return its tensors, or raise :class:`UpdateRejected`.

    The size limit applies to the bytes as uploaded (encoded); a compressed update is
    decoded (:func:`~.compression.decode_update`, which checks its parts) before the
    checks on the dense update it stands for."""
    if len(payload) > expected.max_bytes:
        raise _reject(
            RejectReason.TOO_LARGE, f"{len(payload)} bytes exceeds the limit {expected.max_bytes}"
        )
    digest = sha256_hex(payload)
    if digest != manifest.sha256:
        raise _reject(
            RejectReason.DIGEST_MISMATCH,
            f"payload sha256 {digest[:12]}… does not match the manifest's {manifest.sha256[:12]}…",
        )
    check_manifest(manifest, expected)
    weights = decode_update(weights_from_bytes(payload), manifest.encoding, expected.specs)
    check_tensors(weights, expected)
    return weights
