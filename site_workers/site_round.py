"""The site round: fetch the global model, train locally, upload the update.

``run_site_round`` is the one function every runtime calls: the embedded default runs it
in local processes, a site's Prefect worker runs it in the site's work pool. Its input is
a :class:`RoundSpec` (what the coordinator asks) plus the site's own settings (what never
leaves the site); its output is metadata only.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedround.tasks import run_context
from fedround.tasks.core import keys
from fedround.tasks.core.config import ModelConfig, TrainingConfig
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.core.evaluation import evaluate
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.models import build_model
from fedround.tasks.core.serialization import sha256_hex, weights_from_bytes, weights_to_bytes
from fedround.tasks.object_store import ObjectStore, open_store

from .contract import check_site_contract
from .data import TEST_FILE, TRAIN_FILE, load_site_data
from .settings import SiteSettings
from .training import train_locally

log = logging.getLogger(__name__)


class RoundSpec(BaseModel):
    """What the coordinator asks of one site in one round."""

    model_config = ConfigDict(frozen=True)

    federation: str
    run_id: str
    round: int
    site: str
    attempt: int = 1
    nonce: str
    global_sha256: str
    seed: int
    model: ModelConfig
    training: TrainingConfig
    # Federation context (tenant, config revision, ...): MLflow runs the site's code starts
    # get it as tags through the fedround MLflow plugin.
    context: dict[str, str] = Field(default_factory=dict)
    # When the coordinator opened the round (epoch seconds): the site reports how long the
    # round took to reach it. On one machine this is exact; across machines, clock skew adds.
    dispatched_at: float | None = None


class SiteRoundResult(BaseModel):
    """What comes back: metadata about the uploaded update, never data."""

    site: str
    round: int
    ok: bool
    num_examples: int = 0
    update_key: str | None = None
    manifest_key: str | None = None
    nbytes_up: int = 0
    nbytes_down: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


class EvalSpec(BaseModel):
    """Evaluate a published model on the site's own held-out data (``test.npz``)."""

    model_config = ConfigDict(frozen=True)

    federation: str
    site: str
    model_key: str
    model_sha256: str
    model: ModelConfig


class SiteEvalResult(BaseModel):
    """Only metrics come back from a federated evaluation."""

    site: str
    ok: bool
    num_examples: int = 0
    loss: float | None = None
    accuracy: float | None = None
    seconds: float = 0.0
    error: str | None = None


class SiteError(FedroundError):
    """The site could not take part in the round; the message says why."""


@lru_cache(maxsize=8)
def _tensors(data_file: Path, mtime_ns: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_site_data(data_file)
    return torch.from_numpy(data.features), torch.from_numpy(data.labels)


def _site_tensors(settings: SiteSettings) -> tuple[torch.Tensor, torch.Tensor]:
    data_file = settings.data_dir / TRAIN_FILE
    return _tensors(data_file, data_file.stat().st_mtime_ns)


def check_serves(settings: SiteSettings, federation: str, site: str) -> None:
    """Refuse work meant for another site: its pool may be misrouted."""
    if (settings.federation, settings.site) != (federation, site):
        raise SiteError(
            f"this worker serves {settings.federation}/{settings.site}, not {federation}/{site}: "
            "check the work pool the deployment targets"
        )


def _store(settings: SiteSettings) -> ObjectStore:
    return open_store(settings.object_store)


def fetch_global(store: ObjectStore, spec: RoundSpec) -> tuple[dict[str, torch.Tensor], int]:
    """The round's global weights, checked against the digest the coordinator announced."""
    payload = store.get(keys.global_key(spec.federation, spec.run_id, spec.round))
    digest = sha256_hex(payload)
    if digest != spec.global_sha256:
        raise SiteError(
            f"global model for round {spec.round} has sha256 {digest[:12]}…, the coordinator "
            f"announced {spec.global_sha256[:12]}…: refusing to train on it"
        )
    return weights_from_bytes(payload), len(payload)


def run_site_round(settings: SiteSettings, spec: RoundSpec) -> SiteRoundResult:
    """Train on the site's data from the round's global model and upload the delta."""
    started = time.perf_counter()
    dispatch_latency = time.time() - spec.dispatched_at if spec.dispatched_at else None
    check_serves(settings, spec.federation, spec.site)
    torch.set_num_threads(settings.threads)
    run_context.adopt(
        {**spec.context, "run_id": spec.run_id, "round": spec.round, "site": spec.site}
    )
    store = _store(settings)
    global_weights, nbytes_down = fetch_global(store, spec)
    model = build_model(spec.model, seed=0)
    model.load_state_dict(global_weights)
    features, labels = _site_tensors(settings)
    local = train_locally(model, features, labels, spec.training, spec.seed)
    delta = {name: local.weights[name] - global_weights[name] for name in global_weights}
    payload = weights_to_bytes(delta)
    metrics = {
        "train_loss": local.loss,
        "train_accuracy": local.accuracy,
        "train_seconds": local.seconds,
        "bytes_down": float(nbytes_down),
    }
    if dispatch_latency is not None:
        metrics["dispatch_latency_seconds"] = dispatch_latency
    manifest = UpdateManifest(
        federation=spec.federation,
        run_id=spec.run_id,
        round=spec.round,
        site=spec.site,
        attempt=spec.attempt,
        nonce=spec.nonce,
        num_examples=local.num_examples,
        sha256=sha256_hex(payload),
        nbytes=len(payload),
        metrics=metrics,
    )
    update_key = keys.update_key(spec.federation, spec.run_id, spec.round, spec.site)
    manifest_key = keys.update_manifest_key(spec.federation, spec.run_id, spec.round, spec.site)
    store.put(update_key, payload)  # data first, manifest last: a manifest means complete
    store.put(manifest_key, manifest.to_json())
    seconds = time.perf_counter() - started
    log.info(
        "site %s round %d: %d examples, loss %.4f, %d bytes up",
        spec.site,
        spec.round,
        local.num_examples,
        local.loss,
        len(payload),
    )
    return SiteRoundResult(
        site=spec.site,
        round=spec.round,
        ok=True,
        num_examples=local.num_examples,
        update_key=update_key,
        manifest_key=manifest_key,
        nbytes_up=len(payload) + len(manifest.to_json()),
        nbytes_down=nbytes_down,
        metrics=metrics,
        seconds=seconds,
    )


def run_site_contract(settings: SiteSettings, federation: str, run_id: str) -> ContractReport:
    """Fetch the federation's suite for this run and check the site's data against it."""
    import json

    store = _store(settings)
    suite: dict[str, Any] = json.loads(store.get(keys.contract_key(federation, run_id)))
    return check_site_contract(settings.data_dir / TRAIN_FILE, suite, settings.site)


def run_site_evaluation(settings: SiteSettings, spec: EvalSpec) -> SiteEvalResult:
    """Evaluate a published model on this site's held-out data; return metrics only."""
    started = time.perf_counter()
    check_serves(settings, spec.federation, spec.site)
    torch.set_num_threads(settings.threads)
    payload = _store(settings).get(spec.model_key)
    if sha256_hex(payload) != spec.model_sha256:
        raise SiteError(f"model {spec.model_key} does not match its announced sha256")
    model = build_model(spec.model, seed=0)
    model.load_state_dict(weights_from_bytes(payload))
    data = load_site_data(settings.data_dir / TEST_FILE)
    result = evaluate(model, torch.from_numpy(data.features), torch.from_numpy(data.labels))
    return SiteEvalResult(
        site=spec.site,
        ok=True,
        num_examples=result.num_examples,
        loss=result.loss,
        accuracy=result.accuracy,
        seconds=time.perf_counter() - started,
    )
