"""Strategy state on disk: JSON for the values, safetensors for the tensors.

A strategy's ``state_dict()`` is a dict of JSON values in which any leaf may be a
``torch.Tensor`` (server momentum, optimizer moments). :func:`split_tensors` replaces each
tensor by ``{"$tensor": "<path>"}`` (its keys joined by ``/``) and returns the tensors by
path, to be written as safetensors; :func:`join_tensors` puts them back. Tensors keep
their dtype and bytes exactly, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

TENSOR = "$tensor"
SEPARATOR = "/"


def split_tensors(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-serialisable state with tensor references, tensors by reference path)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        plain: dict[str, Any] = {}
        for key, value in node.items():
            if not isinstance(key, str) or key.startswith("$") or SEPARATOR in key:
                raise ValueError(
                    f"strategy state keys must be strings without '/' or a leading '$', got {key!r}"
                )
            path = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                tensors[path] = value.detach().cpu().contiguous()
                plain[key] = {TENSOR: path}
            elif isinstance(value, Mapping):
                plain[key] = walk(value, path + SEPARATOR)
            else:
                plain[key] = value
        return plain

    return walk(state, ""), tensors


def join_tensors(plain: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The state :func:`split_tensors` split, with every reference replaced by its tensor;
    raises ``ValueError`` on a reference to a tensor that is not there, or a tensor that
    nothing references."""
    used: set[str] = set()

    def walk(node: Mapping[str, Any]) -> dict[str, Any]:
        joined: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, Mapping) and set(value) == {TENSOR}:
                path = value[TENSOR]
                if path not in tensors:
                    raise ValueError(f"strategy state refers to tensor {path!r}, which is missing")
                used.add(path)
                joined[key] = tensors[path]
            elif isinstance(value, Mapping):
                joined[key] = walk(value)
            else:
                joined[key] = value
        return joined

    state = walk(plain)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"strategy tensors {unused} are not referenced by the state")
    return state
