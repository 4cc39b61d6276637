"""Compressed updates (tasks/core/compression.py): round trips, unbiased 8-bit stochastic
quantization (statistically, fixed seed), top-k keeps the largest magnitudes, error
feedback loses nothing, garbage is rejected with a reason; the config's bounds; and the
site round with top-k through a local object store, its residual kept on disk and used
by the next round."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedround.site_workers.compressed_update import RESIDUAL
from fedround.site_workers.data import save_site_data
from fedround.site_workers.settings import SiteSettings
from fedround.site_workers.site_round import RoundSpec, run_site_round
from fedround.site_workers.site_state import SiteState
from fedround.tasks import run_context
from fedround.tasks.aggregation import aggregate_updates
from fedround.tasks.core import keys
from fedround.tasks.core.compression import (
    decode_update,
    dequantize,
    encode_update,
    encode_with_feedback,
    quantize,
    topk_count,
)
from fedround.tasks.core.config import (
    CompressionConfig,
    ModelConfig,
    TrainingConfig,
    parse_federation_config,
)
from fedround.tasks.core.errors import ConfigError, RejectReason, UpdateRejected
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.models import build_model
from fedround.tasks.core.serialization import (
    Weights,
    sha256_hex,
    weights_from_bytes,
    weights_to_bytes,
)
from fedround.tasks.core.strategies import build_strategy
from fedround.tasks.core.validation import UpdateExpectation, tensor_specs, validate_update
from fedround.tasks.object_store import LocalObjectStore, ObjectStoreSettings


def _delta(seed: int = 0) -> Weights:
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=generator),
        "conv.bias": torch.randn(8, generator=generator),
        "fc.weight": torch.randn(10, 72, generator=generator) * 0.01,
        "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64),
    }


SPECS = tensor_specs(_delta())


def _reason(tensors: Weights, encoding: str) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        decode_update(tensors, encoding, SPECS)
    return info.value


# --- round trips ------------------------------------------------------------------------


def test_dense_passes_through_unchanged() -> None:
    encoded = encode_update(_delta())
    assert encoded.encoding == "dense"
    decoded = decode_update(encoded.tensors, "dense", SPECS)
    assert all(torch.equal(decoded[n], _delta()[n]) for n in SPECS)


def test_q8_round_trip_is_within_one_step_and_keeps_shapes_and_dtypes() -> None:
    delta = _delta()
    encoded = encode_update(delta, quantize_bits=8, seed=3)
    assert encoded.encoding == "q8"
    assert encoded.tensors["conv.weight::q"].dtype == torch.uint8
    decoded = decode_update(encoded.tensors, "q8", SPECS)
    for name, tensor in delta.items():
        assert decoded[name].shape == tensor.shape and decoded[name].dtype == tensor.dtype
        if tensor.is_floating_point():
            step = float(encoded.tensors[f"{name}::scale"][1])
            assert float((decoded[name] - tensor).abs().max()) <= step * (1 + 1e-5)
    # The integer buffer is not quantized: it travels as it is.
    assert torch.equal(decoded["bn.num_batches_tracked"], torch.tensor(3))
    assert encoded.tensors["bn.num_batches_tracked"].dtype == torch.int64


def test_q8_of_a_constant_tensor_is_exact() -> None:
    q, scale = quantize(torch.full((5,), -0.25), torch.Generator().manual_seed(0))
    assert float(scale[1]) == 0.0
    assert torch.equal(dequantize(q, scale), torch.full((5,), -0.25))


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes() -> None:
    one = weights_to_bytes(encode_update(_delta(), 0.3, 8, seed=11).tensors)
    assert one == weights_to_bytes(encode_update(_delta(), 0.3, 8, seed=11).tensors)
    assert one != weights_to_bytes(encode_update(_delta(), 0.3, 8, seed=12).tensors)


@pytest.mark.parametrize(("ratio", "place"), [(0.5, "mask"), (0.01, "idx"), (1.0, "mask")])
def test_topk_round_trip_is_exact_at_kept_positions_and_zero_elsewhere(
    ratio: float, place: str
) -> None:
    delta = _delta()
    encoded = encode_update(delta, topk_ratio=ratio)
    assert encoded.encoding == "topk"
    assert f"fc.weight::{place}" in encoded.tensors  # whichever is smaller
    decoded = decode_update(encoded.tensors, "topk", SPECS)
    for name in ("conv.weight", "conv.bias", "fc.weight"):
        kept = decoded[name] != 0
        assert int(kept.sum()) == topk_count(delta[name].numel(), ratio)
        assert torch.equal(decoded[name][kept], delta[name][kept])


def test_topk_plus_q8_keeps_the_sparsity_and_values_within_one_step() -> None:
    delta = _delta()
    encoded = encode_update(delta, topk_ratio=0.1, quantize_bits=8, seed=5)
    assert encoded.encoding == "topk+q8"
    decoded = decode_update(encoded.tensors, "topk+q8", SPECS)
    exact = decode_update(encode_update(delta, topk_ratio=0.1).tensors, "topk", SPECS)
    step = float(encoded.tensors["fc.weight::scale"][1])
    kept = exact["fc.weight"] != 0
    assert torch.equal(decoded["fc.weight"][~kept], torch.zeros(int((~kept).sum())))
    assert float((decoded["fc.weight"] - exact["fc.weight"]).abs().max()) <= step * (1 + 1e-5)


def test_top_10_percent_at_8_bits_is_over_twelve_times_smaller() -> None:
    delta = {"w": torch.randn(100, 100, generator=torch.Generator().manual_seed(0))}
    dense = len(weights_to_bytes(delta))
    encoded = encode_update(delta, 0.1, 8, seed=0)
    assert encoded.dense_nbytes == 40_000
    # 1,250 bytes of bitmap + 1,000 levels + the scale and the header, against 40,000.
    assert dense / len(weights_to_bytes(encoded.tensors)) > 12


# --- unbiasedness -----------------------------------------------------------------------


def test_stochastic_quantization_is_unbiased_where_rounding_to_nearest_is_not() -> None:
    # Prepare: levels 0 and 255 pin the grid to step 1; the rest sit 0.3 above a level,
    # where rounding to the nearest level would be biased by −0.3 every time.
    values = torch.cat([torch.tensor([0.0, 255.0]), torch.arange(100) + 0.3])
    generator = torch.Generator().manual_seed(2024)
    trials = 4000
    # Execute: one tensor of 4,000 copies (the same grid), each rounded independently.
    q, scale = quantize(values.repeat(trials, 1), generator)
    mean = dequantize(q, scale).double().mean(dim=0)
    # Assert: each entry is floor or floor+1 with p = 0.3: the mean's standard error is
    # sqrt(0.21 / 4000) ≈ 0.0072; five of them bound every entry, far from the 0.3 bias.
    assert float(scale[1]) == 1.0
    error = (mean - values.double()).abs()
    assert float(error.max()) < 5 * math.sqrt(0.21 / trials)
    assert float(error[2:].mean()) < 0.01
    nearest = values.round()
    assert float((nearest - values)[2:].abs().min()) == pytest.approx(0.3, abs=1e-5)


# --- top-k ------------------------------------------------------------------------------


def test_topk_keeps_the_k_largest_magnitudes_by_hand() -> None:
    delta = {"w": torch.tensor([0.5, -3.0, 2.0, 0.1, -0.2])}
    encoded = encode_update(delta, topk_ratio=0.4)  # ceil(0.4 × 5) = 2 entries
    assert torch.equal(encoded.tensors["w::mask"], torch.tensor([0b01100000], dtype=torch.uint8))
    assert torch.equal(encoded.tensors["w::values"], torch.tensor([-3.0, 2.0]))
    decoded = decode_update(encoded.tensors, "topk", tensor_specs(delta))
    assert torch.equal(decoded["w"], torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))


def test_topk_keeps_the_k_largest_magnitudes_of_a_random_tensor() -> None:
    tensor = torch.randn(1000, generator=torch.Generator().manual_seed(9))
    decoded = decode_update(
        encode_update({"w": tensor}, topk_ratio=0.05).tensors, "topk", tensor_specs({"w": tensor})
    )["w"]
    kept = set(decoded.nonzero().reshape(-1).tolist())
    largest = set(tensor.abs().argsort(descending=True)[:50].tolist())
    assert kept == largest


# --- error feedback ---------------------------------------------------------------------


def test_residual_plus_sent_is_the_delta_exactly() -> None:
    delta = _delta()
    encoded, residual = encode_with_feedback(delta, None, topk_ratio=0.1)
    sent = decode_update(encoded.tensors, encoded.encoding, SPECS)
    for name in delta:
        assert torch.equal(sent[name] + residual[name], delta[name])
    # Next round: the residual is added before encoding, and again nothing is lost.
    second = _delta(seed=1)
    encoded2, residual2 = encode_with_feedback(second, residual, topk_ratio=0.1)
    sent2 = decode_update(encoded2.tensors, encoded2.encoding, SPECS)
    for name in delta:
        assert torch.equal(sent2[name] + residual2[name], second[name] + residual[name])


def test_over_many_rounds_what_was_sent_plus_the_residual_is_every_delta() -> None:
    residual: Weights | None = None
    sent_total = {n: torch.zeros_like(t) for n, t in _delta().items()}
    delta_total = {n: torch.zeros_like(t) for n, t in _delta().items()}
    for round_ in range(6):
        delta = _delta(seed=round_)
        encoded, residual = encode_with_feedback(delta, residual, 0.05, 8, seed=round_)
        sent = decode_update(encoded.tensors, encoded.encoding, SPECS)
        for name in delta:
            sent_total[name] += sent[name]
            delta_total[name] += delta[name]
    assert residual is not None
    for name in delta_total:
        assert torch.allclose(sent_total[name] + residual[name], delta_total[name], atol=1e-5)


def test_a_residual_of_another_model_is_ignored() -> None:
    delta = _delta()
    stale = {"conv.weight": torch.ones(2, 2)}
    encoded, residual = encode_with_feedback(delta, stale, topk_ratio=0.1)
    sent = decode_update(encoded.tensors, encoded.encoding, SPECS)
    assert torch.equal(sent["conv.weight"] + residual["conv.weight"], delta["conv.weight"])


# --- garbage is rejected with a reason --------------------------------------------------


def _sparse() -> Weights:
    # 1 %: positions as int32 indices for the weights, as a bitmap for the 8 biases.
    return dict(encode_update(_delta(), topk_ratio=0.01).tensors)


def _quantized() -> Weights:
    return dict(encode_update(_delta(), quantize_bits=8, seed=0).tensors)


def test_unknown_encoding_is_rejected() -> None:
    error = _reason(_sparse(), "zip")
    assert error.reason is RejectReason.BAD_ENCODING
    assert "unknown encoding 'zip'" in str(error)


def test_out_of_range_indices_are_rejected() -> None:
    tensors = _sparse()
    tensors["fc.weight::idx"] = torch.tensor([3, 720, 900, 1000], dtype=torch.int32)[:2].clone()
    tensors["fc.weight::values"] = torch.ones(2)
    error = _reason(tensors, "topk")
    assert error.reason is RejectReason.BAD_ENCODING
    assert "positions in [3, 720], outside [0, 719]" in str(error)


def test_negative_indices_are_rejected() -> None:
    tensors = _sparse()
    assert tensors["conv.weight::idx"].shape == (3,)
    tensors["conv.weight::idx"] = torch.tensor([-1, 5, 9], dtype=torch.int32)
    error = _reason(tensors, "topk")
    assert error.reason is RejectReason.BAD_ENCODING
    assert "positions in [-1, 9], outside [0, 287]" in str(error)


def test_a_tensor_with_both_indices_and_a_bitmap_is_rejected() -> None:
    tensors = _sparse()
    assert "conv.bias::mask" in tensors
    tensors["conv.bias::idx"] = torch.tensor([0], dtype=torch.int32)
    error = _reason(tensors, "topk")
    assert error.reason is RejectReason.WRONG_KEYS
    assert "got ['::idx', '::mask', '::values']" in str(error)


def test_repeated_indices_are_rejected() -> None:
    tensors = _sparse()
    tensors["fc.weight::idx"] = torch.tensor([4, 4], dtype=torch.int32)
    tensors["fc.weight::values"] = torch.ones(2)
    error = _reason(tensors, "topk")
    assert error.reason is RejectReason.BAD_ENCODING
    assert "not strictly increasing" in str(error)


def test_indices_of_the_wrong_dtype_are_rejected() -> None:
    tensors = _sparse()
    tensors["fc.weight::idx"] = tensors["fc.weight::idx"].to(torch.float32)
    error = _reason(tensors, "topk")
    assert error.reason is RejectReason.WRONG_DTYPE
    assert "'fc.weight::idx' has dtype float32, expected int32" in str(error)


def test_values_that_do_not_match_their_indices_are_rejected() -> None:
    tensors = _sparse()
    tensors["fc.weight::values"] = torch.ones(5)
    error = _reason(tensors, "topk")
    assert error.reason is RejectReason.WRONG_SHAPE


def test_a_bitmap_with_bits_past_the_end_or_a_wrong_count_is_rejected() -> None:
    odd = {"w": torch.randn(10, generator=torch.Generator().manual_seed(1))}
    parts = dict(encode_update(odd, topk_ratio=0.5).tensors)  # 5 of 10: a 2-byte bitmap
    assert parts["w::mask"].shape == (2,)
    parts["w::mask"] = torch.tensor([0b11110000, 0b00100000], dtype=torch.uint8)  # bit 10
    with pytest.raises(UpdateRejected, match="sets bits past the tensor's 10 entries"):
        decode_update(parts, "topk", tensor_specs(odd))
    parts["w::mask"] = torch.tensor([0b11100000, 0b00000000], dtype=torch.uint8)  # 3 ≠ 5
    with pytest.raises(UpdateRejected) as info:
        decode_update(parts, "topk", tensor_specs(odd))
    assert info.value.reason is RejectReason.WRONG_SHAPE
    assert "'w::values' has shape (5,), expected (3,)" in str(info.value)


def test_quantized_levels_of_the_wrong_shape_or_dtype_are_rejected() -> None:
    tensors = _quantized()
    tensors["fc.weight::q"] = tensors["fc.weight::q"].reshape(-1)
    assert _reason(tensors, "q8").reason is RejectReason.WRONG_SHAPE
    tensors = _quantized()
    tensors["fc.weight::q"] = tensors["fc.weight::q"].to(torch.int16)
    assert _reason(tensors, "q8").reason is RejectReason.WRONG_DTYPE


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_scale_is_rejected(bad: float) -> None:
    tensors = _quantized()
    tensors["conv.weight::scale"] = torch.tensor([0.0, bad])
    error = _reason(tensors, "q8")
    assert error.reason is RejectReason.NOT_FINITE
    assert "'conv.weight::scale' has a NaN/inf scale" in str(error)


def test_a_negative_step_is_rejected() -> None:
    tensors = _quantized()
    tensors["conv.weight::scale"] = torch.tensor([0.0, -1.0])
    assert _reason(tensors, "q8").reason is RejectReason.BAD_ENCODING


def test_missing_and_extra_parts_are_rejected() -> None:
    tensors = _quantized()
    del tensors["conv.bias::scale"]
    error = _reason(tensors, "q8")
    assert error.reason is RejectReason.WRONG_KEYS
    assert "needs parts ['::q', '::scale']" in str(error)
    tensors = _quantized() | {"smuggled": torch.zeros(3)}
    error = _reason(tensors, "q8")
    assert error.reason is RejectReason.WRONG_KEYS
    assert "'smuggled'" in str(error)
    # An update encoded one way but announced as another is refused, not misread.
    assert _reason(_quantized(), "topk+q8").reason is RejectReason.WRONG_KEYS


# --- at the coordinator -----------------------------------------------------------------


def _manifest(payload: bytes, encoding: str) -> UpdateManifest:
    return UpdateManifest(
        federation="fed",
        run_id="run",
        round=1,
        site="site-a",
        nonce="n1",
        num_examples=10,
        sha256=sha256_hex(payload),
        nbytes=len(payload),
        encoding=encoding,
    )


def _expectation(max_bytes: int) -> UpdateExpectation:
    return UpdateExpectation(
        federation="fed",
        run_id="run",
        round=1,
        nonce="n1",
        site="site-a",
        specs=SPECS,
        max_bytes=max_bytes,
        max_num_examples=100,
    )


def test_the_coordinator_decodes_then_validates_and_the_size_limit_is_on_encoded_bytes() -> None:
    delta = _delta()
    encoded = encode_update(delta, 0.1, 8, seed=1)
    payload = weights_to_bytes(encoded.tensors)
    dense = len(weights_to_bytes(delta))
    limit = (len(payload) + dense) // 2  # the compressed update fits, a dense one would not
    weights = validate_update(_manifest(payload, "topk+q8"), payload, _expectation(limit))
    assert torch.equal(
        weights["fc.weight"], decode_update(encoded.tensors, "topk+q8", SPECS)["fc.weight"]
    )
    dense_payload = weights_to_bytes(delta)
    with pytest.raises(UpdateRejected) as info:
        validate_update(_manifest(dense_payload, "dense"), dense_payload, _expectation(limit))
    assert info.value.reason is RejectReason.TOO_LARGE


def test_a_decoded_update_still_faces_the_dense_checks() -> None:
    delta = _delta()
    delta["conv.bias"][0] = math.nan
    tensors = dict(encode_update(delta, topk_ratio=1.0).tensors)
    payload = weights_to_bytes(tensors)
    with pytest.raises(UpdateRejected) as info:
        validate_update(_manifest(payload, "topk"), payload, _expectation(1 << 20))
    assert info.value.reason is RejectReason.NOT_FINITE


def test_a_manifest_without_encoding_means_dense() -> None:
    raw = _manifest(b"x", "dense").model_dump(mode="json")
    del raw["encoding"]
    assert UpdateManifest.model_validate(raw).encoding == "dense"


# --- the config -------------------------------------------------------------------------

BASE = "federation: demo\ncontract: suite.json\nsites: [{name: a}]\n"


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_a_topk_ratio_out_of_range_names_the_field_and_the_range(ratio: float) -> None:
    with pytest.raises(ConfigError) as info:
        parse_federation_config(BASE + f"compression: {{topk_ratio: {ratio}}}\n")
    assert "compression.topk_ratio" in str(info.value)
    assert "must be in (0, 1]" in str(info.value)


def test_quantize_bits_other_than_8_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_federation_config(BASE + "compression: {quantize_bits: 4}\n")
    assert "compression.quantize_bits" in str(info.value)
    assert "must be 8 (got 4)" in str(info.value)


def test_an_unknown_compression_option_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"compression\.ratio"):
        parse_federation_config(BASE + "compression: {ratio: 0.1}\n")


def test_the_config_names_its_encoding() -> None:
    config = parse_federation_config(BASE + "compression: {topk_ratio: 0.1, quantize_bits: 8}\n")
    assert config.compression.encoding == "topk+q8"
    assert parse_federation_config(BASE).compression.encoding == "dense"
    assert CompressionConfig(quantize_bits=8).encoding == "q8"


# --- the site round, twice, through a local object store --------------------------------

MODEL = ModelConfig.model_validate(
    {"factory": "logistic_regression", "in_features": 6, "out_features": 3}
)


def _site(tmp_path: Path) -> SiteSettings:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(48, 6)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64) + (features[:, 1] > 0.5)
    save_site_data(tmp_path / "site" / "train.npz", features, labels)
    return SiteSettings(
        site="site-a",
        federation="fed",
        data_dir=tmp_path / "site",
        object_store=ObjectStoreSettings(kind="local", root=tmp_path / "store"),
    )


def _round(
    settings: SiteSettings, run_id: str, round_: int, weights: Weights, ratio: float | None
) -> tuple[UpdateManifest, Weights]:
    """Publish ``weights`` as the round's global model, run the site round, and return the
    manifest and the update as the coordinator decodes it."""
    assert settings.object_store.root is not None
    store = LocalObjectStore(settings.object_store.root)
    payload = weights_to_bytes(weights)
    store.put(keys.global_key("fed", run_id, round_), payload)
    spec = RoundSpec(
        federation="fed",
        run_id=run_id,
        round=round_,
        site="site-a",
        nonce=f"n{round_}",
        global_sha256=sha256_hex(payload),
        seed=100 + round_,
        model=MODEL,
        training=TrainingConfig(batch_size=16, learning_rate=0.1),
        compression=CompressionConfig(topk_ratio=ratio),
    )
    with run_context.federation_context():  # the site round adopts its context: undo it
        result = run_site_round(settings, spec)
    assert result.ok
    manifest = UpdateManifest.from_json(
        store.get(keys.update_manifest_key("fed", run_id, round_, "site-a"))
    )
    update = store.get(keys.update_key("fed", run_id, round_, "site-a"))
    assert result.nbytes_up == len(update) + len(manifest.to_json())
    expected = UpdateExpectation(
        federation="fed",
        run_id=run_id,
        round=round_,
        nonce=f"n{round_}",
        site="site-a",
        specs=tensor_specs(weights),
        max_bytes=1 << 20,
        max_num_examples=48,
    )
    return manifest, validate_update(manifest, update, expected)


def test_a_site_keeps_its_topk_residual_on_disk_and_adds_it_next_round(tmp_path: Path) -> None:
    settings = _site(tmp_path)
    start = dict(build_model(MODEL, seed=0).state_dict())
    state = SiteState(settings.site_state_dir, "fed", "topk-run")
    # Round 1, with top-k (a third of each tensor) and, beside it, the same round dense:
    # training is deterministic, so the dense run shows the full delta.
    manifest, sent = _round(settings, "topk-run", 1, start, ratio=0.34)
    _, full = _round(settings, "dense-run", 1, start, ratio=None)
    assert manifest.encoding == "topk"
    assert manifest.metrics["bytes_up_dense"] == sum(t.numel() * 4 for t in start.values())
    residual = state.load(RESIDUAL)
    assert residual is not None, "the residual was not persisted at the site"
    assert state.path(RESIDUAL).exists()
    assert int((sent["weight"] != 0).sum()) == topk_count(18, 0.34)
    for name in full:
        assert torch.equal(sent[name] + residual[name], full[name])
        assert float(residual[name].abs().sum()) > 0
    # Round 2 (a new call: nothing is kept in memory, as after a site restart) from the
    # next global model: what it sends plus its new residual is round 2's own delta plus
    # round 1's residual, read back from disk.
    following = {n: start[n] + sent[n] for n in start}
    _, sent2 = _round(settings, "topk-run", 2, following, ratio=0.34)
    _, full2 = _round(settings, "dense-run", 2, following, ratio=None)
    residual2 = state.load(RESIDUAL)
    assert residual2 is not None
    for name in full2:
        assert torch.equal(sent2[name] + residual2[name], full2[name] + residual[name])
    # And the coordinator aggregates the compressed update like any other.
    store = LocalObjectStore(tmp_path / "store")
    outcome = aggregate_updates(
        store,
        build_strategy("fedavg"),
        following,
        {
            "site-a": UpdateExpectation(
                federation="fed",
                run_id="topk-run",
                round=2,
                nonce="n2",
                site="site-a",
                specs=tensor_specs(following),
                max_bytes=1 << 20,
                max_num_examples=48,
            )
        },
    )
    assert outcome.accepted == {"site-a": 48} and outcome.weights is not None
    for name in following:
        assert torch.allclose(outcome.weights[name], following[name] + sent2[name])


def test_a_site_that_lost_its_residual_starts_again_without_it(tmp_path: Path) -> None:
    settings = _site(tmp_path)
    start = dict(build_model(MODEL, seed=0).state_dict())
    _, sent = _round(settings, "topk-run", 1, start, ratio=0.34)
    state = SiteState(settings.site_state_dir, "fed", "topk-run")
    state.path(RESIDUAL).unlink()  # a new disk
    following = {n: start[n] + sent[n] for n in start}
    _, sent2 = _round(settings, "topk-run", 2, following, ratio=0.34)
    _, full2 = _round(settings, "dense-run", 2, following, ratio=None)
    residual2 = state.load(RESIDUAL)
    assert residual2 is not None
    for name in full2:
        assert torch.equal(sent2[name] + residual2[name], full2[name])
    assert weights_from_bytes(weights_to_bytes(residual2)).keys() == full2.keys()
