"""SCAFFOLD at a real site round (``run_site_round`` on a local object store): the site's
control variate is kept on its disk across rounds and fresh calls (a restarted worker), a
retried round starts from the same variate, a site that lost its variate falls back to
cᵢ = 0 and says so, and what it uploads aggregates as the hand computation says.

The user's ``train`` takes ``local_epochs`` plain SGD steps on loss = g·w, with g the mean
of the site's features, so every number below is exact.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedround.site_workers.scaffold import KIND, ControlVariateError
from fedround.site_workers.settings import SiteSettings
from fedround.site_workers.site_round import RoundSpec, run_site_round
from fedround.site_workers.site_state import SiteState
from fedround.tasks.aggregation import aggregate_updates
from fedround.tasks.control_variate import publish_control
from fedround.tasks.core import keys
from fedround.tasks.core.config import (
    CompressionConfig,
    ModelConfig,
    StrategyConfig,
    TrainingConfig,
)
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.serialization import sha256_hex, weights_from_bytes, weights_to_bytes
from fedround.tasks.core.strategies import build_strategy
from fedround.tasks.core.validation import UpdateExpectation, tensor_specs, validate_update
from fedround.tasks.object_store import LocalObjectStore, ObjectStoreSettings

from . import scaffold_code

PKG = scaffold_code.__name__
FED, RUN = "fed", "run-1"


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    saved = dict(os.environ)  # run_site_round adopts the run context into FEDROUND_* vars
    yield
    os.environ.clear()
    os.environ.update(saved)


def _site(tmp_path: Path, name: str, feature: float) -> SiteSettings:
    data_dir = tmp_path / name
    data_dir.mkdir(exist_ok=True)
    np.savez(
        data_dir / "train.npz",
        features=np.full((4, 1), feature, dtype=np.float32),
        labels=np.zeros(4, dtype=np.int64),
    )
    return SiteSettings(
        site=name,
        federation=FED,
        data_dir=data_dir,
        object_store=ObjectStoreSettings(kind="local", root=tmp_path / "store"),
    )


def _publish(store: LocalObjectStore, round_: int, w: float, c: float | None) -> tuple[str, str]:
    """The coordinator's part: the round's global model and c (from its strategy state)."""
    weights = {"w": torch.tensor([w])}
    payload = weights_to_bytes(weights)
    store.put(keys.global_key(FED, RUN, round_), payload)
    state = {} if c is None else {"control": {"w": torch.tensor([c], dtype=torch.float64)}}
    return sha256_hex(payload), publish_control(store, FED, RUN, round_, state, weights)


def _spec(site: str, round_: int, digests: tuple[str, str], **extra: object) -> RoundSpec:
    return RoundSpec(
        federation=FED,
        run_id=RUN,
        round=round_,
        site=site,
        nonce=f"n{round_}",
        global_sha256=digests[0],
        control_sha256=digests[1],
        seed=1,
        model=ModelConfig(factory=f"{PKG}:one_weight"),
        training=TrainingConfig(
            train=f"{PKG}:constant_gradient", learning_rate=0.25, local_epochs=2
        ),
        strategy=StrategyConfig(name="scaffold"),
        **extra,  # type: ignore[arg-type]
    )


def _uploaded(store: LocalObjectStore, site: str, round_: int) -> dict[str, float]:
    tensors = weights_from_bytes(store.get(keys.update_key(FED, RUN, round_, site)))
    return {name: t.item() for name, t in tensors.items()}


def test_the_variate_survives_restarts_retries_start_alike_and_a_lost_one_resets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    site = _site(tmp_path, "a", feature=2.0)  # g = 2

    # Round 1: x = 1, c = 0, no variate at the site yet: cᵢ = 0, steps of 2·0.25:
    # Δy = −1, cᵢ⁺ = 0 − 0 + 1/(2·0.25) = 2, Δc = 2
    with caplog.at_level(logging.WARNING, logger="fedround.site_workers.scaffold"):
        first = run_site_round(site, _spec("a", 1, _publish(store, 1, 1.0, None)))
    assert _uploaded(store, "a", 1) == {"w": -1.0, "control/w": 2.0}
    assert first.metrics["scaffold_variate_reset"] == 1.0
    assert first.metrics["scaffold_local_steps"] == 2.0
    assert "starting from c_i = 0" in caplog.text

    # Round 2, a restarted worker (new settings object, nothing in memory): x = 0, c = 0.5;
    # the site loads cᵢ = 2, steps with 2 + 0.5 − 2 = 0.5: Δy = −0.25, cᵢ⁺ = 2, Δc = 0
    restarted = _site(tmp_path, "a", feature=2.0)
    digests = _publish(store, 2, 0.0, 0.5)
    second = run_site_round(restarted, _spec("a", 2, digests))
    assert _uploaded(store, "a", 2) == {"w": -0.25, "control/w": 0.0}
    assert second.metrics["scaffold_variate_reset"] == 0.0
    payload = store.get(keys.update_key(FED, RUN, 2, "a"))

    # Round 2 again (a retry, or a coordinator resumed before committing round 2): the same
    # starting variate, the same bytes
    run_site_round(restarted, _spec("a", 2, digests, attempt=2))
    assert store.get(keys.update_key(FED, RUN, 2, "a")) == payload

    # Round 3 after the disk was lost: fallback cᵢ = 0, said in the log and the metrics;
    # steps with 2 + 0.5 − 0 = 2.5: Δy = −1.25, cᵢ⁺ = 0 − 0.5 + 1.25/0.5 = 2, Δc = 2
    shutil.rmtree(site.site_state_dir)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedround.site_workers.scaffold"):
        third = run_site_round(restarted, _spec("a", 3, _publish(store, 3, 0.0, 0.5)))
    assert _uploaded(store, "a", 3) == {"w": -1.25, "control/w": 2.0}
    assert third.metrics["scaffold_variate_reset"] == 1.0
    assert "state was lost" in caplog.text
    manifest = UpdateManifest.from_json(store.get(keys.update_manifest_key(FED, RUN, 3, "a")))
    assert manifest.metrics["scaffold_variate_reset"] == 1.0
    kept = SiteState(site.site_state_dir, FED, RUN).load(KIND)
    assert kept is not None and kept["round"].item() == 3 and kept["after/w"].item() == 2.0


def test_uploaded_updates_aggregate_to_the_hand_computed_round(tmp_path: Path) -> None:
    # Prepare: two sites, g = 2 and g = −1, round 1 from x = 1, c = 0; N = 4 sites
    store = LocalObjectStore(tmp_path / "store")
    digests = _publish(store, 1, 1.0, None)
    for name, feature in (("a", 2.0), ("b", -1.0)):
        run_site_round(_site(tmp_path, name, feature), _spec(name, 1, digests))
    expectations = {
        name: UpdateExpectation(
            federation=FED,
            run_id=RUN,
            round=1,
            nonce="n1",
            site=name,
            specs=tensor_specs({"w": torch.zeros(1)}, control=True),
            max_bytes=1 << 20,
            max_num_examples=4,
        )
        for name in ("a", "b")
    }
    strategy = build_strategy(StrategyConfig(name="scaffold"), population=4)
    # Execute
    outcome = aggregate_updates(store, strategy, {"w": torch.tensor([1.0])}, expectations)
    # Assert: Δy = −1 and +0.5 (4 examples each): x = 1 + (−1 + 0.5)/2 = 0.75;
    # Δc = 2 and −1: c = (2 − 1)/4 = 0.25
    assert outcome.rejected == {}
    assert outcome.weights is not None and outcome.weights["w"].item() == 0.75
    assert strategy.state_dict()["control"]["w"].item() == 0.25
    # The same updates in a FedAvg run are rejected: control tensors are SCAFFOLD's only
    plain = {
        name: UpdateExpectation(**{**e.__dict__, "specs": tensor_specs({"w": torch.zeros(1)})})
        for name, e in expectations.items()
    }
    refused = aggregate_updates(store, build_strategy("fedavg"), {"w": torch.ones(1)}, plain)
    assert refused.weights is None and sorted(refused.rejected) == ["a", "b"]
    assert all("control/w" in why for why in refused.rejected.values())


def test_a_tampered_control_variate_is_refused(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    digests = _publish(store, 1, 1.0, 0.5)
    store.put(keys.global_control_key(FED, RUN, 1), weights_to_bytes({"w": torch.tensor([9.0])}))
    with pytest.raises(ControlVariateError, match="control variate for round 1 has sha256"):
        run_site_round(_site(tmp_path, "a", 2.0), _spec("a", 1, digests))
    assert not store.exists(keys.update_key(FED, RUN, 1, "a"))


def test_the_control_deltas_travel_compressed_like_the_model_delta(tmp_path: Path) -> None:
    # Prepare: top-k (all entries) + 8-bit quantization; one value per tensor is exact
    store = LocalObjectStore(tmp_path / "store")
    compression = CompressionConfig(topk_ratio=1.0, quantize_bits=8)
    spec = _spec("a", 1, _publish(store, 1, 1.0, None), compression=compression)
    # Execute
    run_site_round(_site(tmp_path, "a", 2.0), spec)
    manifest = UpdateManifest.from_json(store.get(keys.update_manifest_key(FED, RUN, 1, "a")))
    expected = UpdateExpectation(
        federation=FED,
        run_id=RUN,
        round=1,
        nonce="n1",
        site="a",
        specs=tensor_specs({"w": torch.zeros(1)}, control=True),
        max_bytes=1 << 20,
        max_num_examples=4,
    )
    decoded = validate_update(manifest, store.get(keys.update_key(FED, RUN, 1, "a")), expected)
    # Assert: encoded as sent, decoded to the same Δy and Δc as the dense round
    assert manifest.encoding == "topk+q8"
    assert {name: t.item() for name, t in decoded.items()} == {"w": -1.0, "control/w": 2.0}
