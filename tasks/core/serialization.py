"""Weights travel as safetensors bytes: no pickle, no code, only named tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from .errors import RejectReason, UpdateRejected

Weights = dict[str, torch.Tensor]


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def weights_to_bytes(weights: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize named tensors to safetensors bytes (contiguous CPU copies, sorted keys)."""
    tensors = {name: weights[name].detach().cpu().contiguous() for name in sorted(weights)}
    return bytes(_save(tensors))


def weights_from_bytes(data: bytes) -> Weights:
    """Parse safetensors bytes. Anything else is rejected as malformed, never executed."""
    try:
        return dict(_load(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UpdateRejected(
            RejectReason.MALFORMED, f"payload is not a valid safetensors file ({exc})"
        ) from exc


def clone_weights(weights: Mapping[str, torch.Tensor]) -> Weights:
    """Detached copies, so callers can mutate the result freely."""
    return {name: tensor.detach().clone() for name, tensor in weights.items()}
