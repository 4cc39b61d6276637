"""The site round: fetch the global model, train locally, upload the update.

``run_site_round`` is the one function every runtime calls: the embedded default runs it
in local processes, a site's Prefect worker runs it in the site's work pool. Its input is
a :class:`RoundSpec` (what the coordinator asks) plus the site's own settings (what never
leaves the site); its output is metadata only.
"""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedround.tasks import run_context
from fedround.tasks.core import keys
from fedround.tasks.core.config import (
    CompressionConfig,
    DataConfig,
    EvaluationConfig,
    ModelConfig,
    PrivacyConfig,
    StrategyConfig,
    TrainingConfig,
)
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.errors import FedroundError, ObjectNotFound
from fedround.tasks.core.evaluation import builtin_metrics
from fedround.tasks.core.federated_eval import eval_report
from fedround.tasks.core.hooks import apply_update_hooks, hooks_for
from fedround.tasks.core.manifest import UpdateManifest
from fedround.tasks.core.models import build_model
from fedround.tasks.core.preprocessing import Preprocessor
from fedround.tasks.core.serialization import sha256_hex, weights_from_bytes, weights_to_bytes
from fedround.tasks.core.signing import sign_manifest
from fedround.tasks.core.usercode import (
    RoundContext,
    UserCodeError,
    call_user,
    check_metrics,
    load_callable,
    load_weights,
)
from fedround.tasks.object_store import ObjectStore, open_store
from fedround.tasks.secure_aggregation import SecureRound

from .compressed_update import prepare_upload
from .contract import check_site_contract
from .data import DataError, load_dataset
from .flower import flower_client
from .scaffold import prepare_variate
from .secure_aggregation import start_secure_round
from .settings import SiteSettings
from .signing_key import load_signing_key
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
    data: DataConfig = DataConfig()
    strategy: StrategyConfig = StrategyConfig()
    compression: CompressionConfig = CompressionConfig()
    # Differential privacy: the site clips its update (central) or clips and noises it (local).
    privacy: PrivacyConfig = PrivacyConfig()
    # The run's federated preprocessor (tables): the site fetches it and checks this digest.
    preprocessing_sha256: str | None = None
    # SCAFFOLD: the server's control variate for the round, published beside the global
    # model (keys.global_control_key); the site checks this digest.
    control_sha256: str | None = None
    # Federation context (tenant, config revision, ...): MLflow runs the site's code starts
    # get it as tags through the fedround MLflow plugin.
    context: dict[str, str] = Field(default_factory=dict)
    # When the coordinator opened the round (epoch seconds): the site reports how long the
    # round took to reach it. On one machine this is exact; across machines, clock skew adds.
    dispatched_at: float | None = None
    # Federated evaluation, one round behind: the site first scores the model it received
    # (round − 1's) on its own test file and reports eval_<metric> with its update.
    evaluation: EvaluationConfig = EvaluationConfig()
    evaluate_received: bool = False
    # Secure aggregation: the update stays at the site and only its masked form leaves it,
    # in the round's later steps (see fedround.site_workers.secure_aggregation).
    secagg: SecureRound | None = None


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
    data: DataConfig = DataConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    # For tables: the preprocessor the model was trained with (JSON in the store) and digest.
    preprocessing_key: str | None = None
    preprocessing_sha256: str | None = None


class SiteEvalResult(BaseModel):
    """Only metrics come back from a federated evaluation."""

    site: str
    ok: bool
    num_examples: int = 0
    loss: float | None = None
    accuracy: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


class SiteError(FedroundError):
    """The site could not take part in the round; the message says why."""


@lru_cache(maxsize=8)
def _preprocessor(payload: bytes) -> Preprocessor:
    return Preprocessor.model_validate_json(payload)


def fetch_preprocessor(store: ObjectStore, key: str, sha256: str | None) -> Preprocessor | None:
    """The run's federated preprocessor, checked against the digest the coordinator sent."""
    if sha256 is None:
        return None
    payload = store.get(key)
    if sha256_hex(payload) != sha256:
        raise SiteError(f"preprocessor {key} does not match its announced sha256: refusing it")
    return _preprocessor(payload)


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
    preprocessor = fetch_preprocessor(
        store, keys.preprocessing_key(spec.federation, spec.run_id), spec.preprocessing_sha256
    )
    model = build_model(spec.model, seed=0)
    load_weights(model, global_weights, spec.model.import_path)
    evaluated = evaluate_received(settings, spec, model, global_weights, preprocessor)
    data = load_dataset(settings.train_path, spec.data, preprocessor)
    if not len(data):
        raise SiteError(f"{settings.train_path.name} has no usable rows (labels missing?)")
    context = RoundContext(
        federation=spec.federation,
        run_id=spec.run_id,
        site=spec.site,
        round=spec.round,
        seed=spec.seed,
        task=data.task,
        num_classes=data.num_classes,
        extra={"data_path": str(settings.train_path)},
    )
    hooks = hooks_for(spec.strategy, global_weights, spec.privacy, spec.seed)
    variate = prepare_variate(store, settings, spec, global_weights)  # SCAFFOLD only
    if variate is not None:
        hooks = [*hooks, variate.hook]
    local = train_locally(model, data, spec.training, context, hooks, spec.privacy)
    unexpected = sorted(set(local.weights) ^ set(global_weights))
    if unexpected:
        raise UserCodeError(f"training changed the model's parameter names: {unexpected[:5]}")
    delta = {name: local.weights[name] - global_weights[name] for name in global_weights}
    delta = apply_update_hooks(hooks, delta)
    metrics = {
        **local.metrics,
        "train_seconds": local.seconds,
        "bytes_down": float(nbytes_down),
        **evaluated,  # eval_<metric>, eval_examples: round − 1's model (federated evaluation)
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
        sha256="",
        nbytes=0,
        metrics=metrics,
    )
    update_key = manifest_key = None
    if spec.secagg is not None:  # the update stays here; only its keys' advert leaves
        nbytes_up = start_secure_round(settings, store, spec.secagg, manifest, delta)
    else:
        upload = prepare_upload(
            delta,
            spec.compression,
            spec.seed,
            settings.site_state_dir,
            spec.federation,
            spec.run_id,
        )
        payload = weights_to_bytes(upload.tensors)
        metrics["bytes_up_dense"] = float(upload.dense_nbytes)  # beside bytes_up (encoded)
        if variate is not None:  # keep c_i⁺ at the site before the update leaves it
            metrics.update(variate.commit())
        manifest = manifest.model_copy(
            update={
                "sha256": sha256_hex(payload),
                "nbytes": len(payload),
                "metrics": metrics,
                "encoding": upload.encoding,
            }
        )
        signing_key = load_signing_key(settings)
        if signing_key is not None:
            manifest = sign_manifest(manifest, signing_key)
        update_key = keys.update_key(spec.federation, spec.run_id, spec.round, spec.site)
        manifest_key = keys.update_manifest_key(spec.federation, spec.run_id, spec.round, spec.site)
        store.put(update_key, payload)  # data first, manifest last: a manifest means complete
        store.put(manifest_key, manifest.to_json())
        upload.commit()  # the error-feedback residual, once the update is uploaded
        nbytes_up = len(payload) + len(manifest.to_json())
    seconds = time.perf_counter() - started
    log.info(
        "site %s round %d: %d examples, train loss %.4f, %d bytes up",
        spec.site,
        spec.round,
        local.num_examples,
        local.loss,
        nbytes_up,
    )
    return SiteRoundResult(
        site=spec.site,
        round=spec.round,
        ok=True,
        num_examples=local.num_examples,
        update_key=update_key,
        manifest_key=manifest_key,
        nbytes_up=nbytes_up,
        nbytes_down=nbytes_down,
        metrics=metrics,
        seconds=seconds,
    )


def evaluate_received(
    settings: SiteSettings,
    spec: RoundSpec,
    model: torch.nn.Module,
    global_weights: dict[str, torch.Tensor],
    preprocessor: Preprocessor | None,
) -> dict[str, float]:
    """Federated evaluation of the model this round starts from (round − 1's result) on the
    site's test file: ``eval_<metric>`` and ``eval_examples``. Empty when the round does not
    ask for it or the site has no test file; an evaluation that fails is logged and left
    out, never the round. The model leaves exactly as it came (weights and mode)."""
    path = settings.test_path
    if not spec.evaluate_received or path is None or not path.exists():
        return {}
    training = model.training
    try:
        data = load_dataset(path, spec.data, preprocessor)
        if not len(data):
            return {}
        metrics = evaluate_model(model, data, spec.evaluation, spec.site, spec.federation, path)
    except (UserCodeError, DataError, ValueError) as exc:
        log.warning("site %s round %d: evaluation left out: %s", spec.site, spec.round, exc)
        return {}
    finally:  # an evaluate function may have moved statistics or the mode: start clean
        load_weights(model, global_weights, spec.model.import_path)
        model.train(training)
    return eval_report(metrics, len(data))


def fetch_data_spec(store: ObjectStore, federation: str, run_id: str) -> DataConfig:
    """The run's data declaration (older runs without one: the demo's arrays)."""
    try:
        return DataConfig.model_validate_json(store.get(keys.data_spec_key(federation, run_id)))
    except ObjectNotFound:
        return DataConfig()


def run_site_contract(settings: SiteSettings, federation: str, run_id: str) -> ContractReport:
    """Fetch the federation's suite and data declaration for this run and check the site's
    data against it; for tables the report also carries the set-up summary (counts and
    sums per column, never rows)."""
    store = _store(settings)
    suite: dict[str, Any] = json.loads(store.get(keys.contract_key(federation, run_id)))
    data = fetch_data_spec(store, federation, run_id)
    return check_site_contract(settings.train_path, suite, settings.site, data)


def run_site_evaluation(settings: SiteSettings, spec: EvalSpec) -> SiteEvalResult:
    """Evaluate a published model on this site's held-out data; return metrics only."""
    started = time.perf_counter()
    check_serves(settings, spec.federation, spec.site)
    torch.set_num_threads(settings.threads)
    store = _store(settings)
    payload = store.get(spec.model_key)
    if sha256_hex(payload) != spec.model_sha256:
        raise SiteError(f"model {spec.model_key} does not match its announced sha256")
    preprocessor = (
        fetch_preprocessor(store, spec.preprocessing_key, spec.preprocessing_sha256)
        if spec.preprocessing_key
        else None
    )
    model = build_model(spec.model, seed=0)
    load_weights(model, weights_from_bytes(payload), spec.model.import_path)
    if settings.test_path is None:
        raise SiteError(f"site {settings.site} has no test_file for evaluation in site.yaml")
    data = load_dataset(settings.test_path, spec.data, preprocessor)
    metrics = evaluate_model(
        model, data, spec.evaluation, settings.site, spec.federation, settings.test_path
    )
    return SiteEvalResult(
        site=spec.site,
        ok=True,
        num_examples=len(data),
        loss=metrics.get("loss"),
        accuracy=metrics.get("accuracy"),
        metrics=metrics,
        seconds=time.perf_counter() - started,
    )


def evaluate_model(
    model: torch.nn.Module,
    data: Any,
    evaluation: EvaluationConfig,
    site: str,
    federation: str,
    data_path: Path | None = None,
) -> dict[str, float]:
    """The federation's ``evaluate`` (checked at the boundary), a Flower client's
    ``evaluate`` (see :mod:`.flower`), or the built-in metrics."""
    if evaluation.evaluate is None:
        return builtin_metrics(model, data)
    who = f"evaluate function {evaluation.evaluate}"
    context = RoundContext(
        federation=federation,
        run_id="",
        site=site,
        round=0,
        seed=0,
        task=data.task,
        num_classes=data.num_classes,
        extra={"data_path": str(data_path)} if data_path else {},
    )
    flower = flower_client(evaluation.evaluate, "evaluate function")
    if flower is not None:
        return flower.evaluate(model, data, context)
    function = load_callable(evaluation.evaluate, "evaluate function")
    model.eval()
    with torch.no_grad():
        return check_metrics(call_user(function, who, model, data, context), who)
