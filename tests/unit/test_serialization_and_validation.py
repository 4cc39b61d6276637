"""Safetensors + manifest round trip; every rejection names its reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedround.tasks.core.errors import RejectReason, UpdateRejected
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.serialization import sha256_hex, weights_from_bytes, weights_to_bytes
from fedround.tasks.core.validation import UpdateExpectation, tensor_specs, validate_update

REFERENCE = {"conv.weight": torch.zeros(2, 3), "conv.bias": torch.zeros(2)}


def _update(**overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = {"conv.weight": torch.ones(2, 3), "conv.bias": torch.full((2,), 0.5)}
    tensors.update(overrides)
    return tensors


def _manifest(payload: bytes, **fields: object) -> UpdateManifest:
    values: dict[str, object] = dict(
        federation="fed",
        run_id="run-1",
        round=3,
        site="site-a",
        nonce="n3",
        num_examples=40,
        sha256=sha256_hex(payload),
        nbytes=len(payload),
    )
    values.update(fields)
    return UpdateManifest(**values)  # type: ignore[arg-type]


EXPECTED = UpdateExpectation(
    federation="fed",
    run_id="run-1",
    round=3,
    nonce="n3",
    site="site-a",
    specs=tensor_specs(REFERENCE),
    max_bytes=10_000,
    max_num_examples=100,
    max_norm=10.0,
)


def test_weights_and_manifest_round_trip() -> None:
    payload = weights_to_bytes(_update())
    manifest = _manifest(payload, metrics={"train_loss": 0.25})
    restored_manifest = UpdateManifest.from_json(manifest.to_json())
    restored = validate_update(restored_manifest, payload, EXPECTED)
    assert restored_manifest == manifest
    assert set(restored) == set(REFERENCE)
    assert torch.equal(restored["conv.weight"], torch.ones(2, 3))
    assert torch.equal(restored["conv.bias"], torch.full((2,), 0.5))


def test_serialization_is_deterministic() -> None:
    assert weights_to_bytes(_update()) == weights_to_bytes(dict(reversed(_update().items())))


def _rejected(manifest: UpdateManifest, payload: bytes, expected=EXPECTED) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        validate_update(manifest, payload, expected)
    return info.value


def test_digest_mismatch_is_rejected() -> None:
    payload = weights_to_bytes(_update())
    tampered = weights_to_bytes(_update(**{"conv.bias": torch.full((2,), 0.75)}))
    error = _rejected(_manifest(payload), tampered)
    assert error.reason is RejectReason.DIGEST_MISMATCH
    assert "does not match the manifest" in str(error)


def test_wrong_shape_is_rejected_naming_the_tensor() -> None:
    payload = weights_to_bytes(_update(**{"conv.weight": torch.ones(3, 2)}))
    error = _rejected(_manifest(payload), payload)
    assert error.reason is RejectReason.WRONG_SHAPE
    assert "'conv.weight' has shape (3, 2), expected (2, 3)" in str(error)


def test_nan_is_rejected() -> None:
    bad = torch.ones(2, 3)
    bad[1, 2] = float("nan")
    payload = weights_to_bytes(_update(**{"conv.weight": bad}))
    error = _rejected(_manifest(payload), payload)
    assert error.reason is RejectReason.NOT_FINITE
    assert "1 NaN/inf" in str(error)


def test_wrong_dtype_is_rejected() -> None:
    payload = weights_to_bytes(_update(**{"conv.bias": torch.zeros(2, dtype=torch.float64)}))
    assert _rejected(_manifest(payload), payload).reason is RejectReason.WRONG_DTYPE


def test_missing_and_extra_tensors_are_rejected() -> None:
    tensors = _update()
    del tensors["conv.bias"]
    tensors["extra"] = torch.zeros(1)
    payload = weights_to_bytes(tensors)
    error = _rejected(_manifest(payload), payload)
    assert error.reason is RejectReason.WRONG_KEYS
    assert "['conv.bias']" in str(error) and "['extra']" in str(error)


@pytest.mark.security("untrusted-site-objects")
def test_oversized_update_is_rejected_before_parsing() -> None:
    payload = weights_to_bytes(_update())
    small = dataclasses.replace(EXPECTED, max_bytes=len(payload) - 1)
    assert _rejected(_manifest(payload), payload, small).reason is RejectReason.TOO_LARGE


@pytest.mark.security("untrusted-site-objects")
def test_malformed_payload_is_rejected_not_parsed_as_pickle() -> None:
    payload = b"\x80\x04\x95 definitely a pickle, never loaded"
    error = _rejected(_manifest(payload), payload)
    assert error.reason is RejectReason.MALFORMED


def test_late_update_from_a_closed_round_is_rejected() -> None:
    payload = weights_to_bytes(_update())
    error = _rejected(_manifest(payload, round=2, nonce="n2"), payload)
    assert error.reason is RejectReason.WRONG_ROUND
    assert "arrived after its round closed" in str(error)


def test_update_for_another_site_or_run_is_rejected() -> None:
    payload = weights_to_bytes(_update())
    assert _rejected(_manifest(payload, site="site-b"), payload).reason is RejectReason.WRONG_SITE
    assert _rejected(_manifest(payload, run_id="other"), payload).reason is RejectReason.WRONG_RUN


@pytest.mark.parametrize("count", [0, 101])
def test_example_count_outside_bounds_is_rejected(count: int) -> None:
    payload = weights_to_bytes(_update())
    error = _rejected(_manifest(payload, num_examples=count), payload)
    assert error.reason is RejectReason.BAD_EXAMPLE_COUNT


def test_update_norm_above_bound_is_rejected() -> None:
    payload = weights_to_bytes(_update(**{"conv.weight": torch.full((2, 3), 5.0)}))
    error = _rejected(_manifest(payload), payload)
    assert error.reason is RejectReason.NORM_TOO_LARGE


def test_weights_from_bytes_refuses_garbage() -> None:
    with pytest.raises(UpdateRejected) as info:
        weights_from_bytes(b"not safetensors")
    assert info.value.reason is RejectReason.MALFORMED
