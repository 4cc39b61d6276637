"""Onboarding a site that brings its own data: ``fedround site init`` and ``site check``.

``init_site`` writes the site's ``site.yaml`` (mode 0600) for data the operator already
has, wherever it lives. ``check_site`` then rehearses, on the site's machine and without
any server, what a run will do there: the federation's data contract on the real data,
and one training step of the federation's model, whose update is checked exactly as the
coordinator would check it. Its report says what would leave the site (the update's
tensors, the contract's counts, the set-up summary) and what never does (the rows, the
files' paths, the credentials).

Credentials never come from a command-line value (it would land in shell history): from
``FEDROUND_S3_ACCESS_KEY`` / ``FEDROUND_S3_SECRET_KEY`` or a secret file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError

from fedround.tasks.core.config import (
    DataConfig,
    FederationConfig,
    format_validation_error,
    load_federation_config,
)
from fedround.tasks.core.contract_report import ContractReport
from fedround.tasks.core.errors import FedroundError, UpdateRejected
from fedround.tasks.object_store import ObjectStoreSettings

from .data import TABLE_SUFFIXES, DataError, read_array_file, read_table
from .settings import SiteSettings, load_site_settings, write_site_settings
from .signing_key import SIGNING_KEY_SUFFIX, ensure_signing_key_file, load_signing_key

log = logging.getLogger(__name__)

ACCESS_KEY_ENV = "FEDROUND_S3_ACCESS_KEY"
SECRET_KEY_ENV = "FEDROUND_S3_SECRET_KEY"
DRY_RUN_ID = "dry-run"


class OnboardingError(FedroundError):
    """Setting up or checking a site failed; the message is one line saying what to fix."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


# --- site init ---------------------------------------------------------------------------


def read_secret_file(path: Path) -> dict[str, str]:
    """S3 keys from a file: YAML (``access_key: …`` / ``secret_key: …``) or ``KEY=value``
    lines; the environment-variable names are accepted as keys too."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise OnboardingError(f"cannot read secret file {path}: {exc.strerror}") from exc
    raw: Any
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raw = None
    if not isinstance(raw, dict):
        raw = {}
        for line in text.splitlines():
            key, sep, value = line.strip().removeprefix("export ").partition("=")
            if sep and not key.startswith("#"):
                raw[key.strip()] = value.strip().strip("'\"")
    aliases = {
        "access_key": "access_key",
        ACCESS_KEY_ENV.lower(): "access_key",
        "secret_key": "secret_key",
        SECRET_KEY_ENV.lower(): "secret_key",
    }
    keys = {aliases[str(k).lower()]: str(v) for k, v in raw.items() if str(k).lower() in aliases}
    if not keys:
        raise OnboardingError(
            f"secret file {path} holds no S3 keys: write 'access_key: …' and 'secret_key: …' "
            f"(or {ACCESS_KEY_ENV}=… and {SECRET_KEY_ENV}=… lines)"
        )
    return keys


def object_store_settings(
    spec: str,
    *,
    endpoint: str | None = None,
    bucket: str | None = None,
    region: str | None = None,
    secure: bool = False,
    secret_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[ObjectStoreSettings, str]:
    """The site's object-store block from ``local:<root>`` or ``s3`` (+ endpoint, bucket),
    and a line saying where its credentials come from."""
    environ = os.environ if environ is None else environ
    if spec.startswith("local:"):
        root = Path(spec.removeprefix("local:")).expanduser()
        if not str(root):
            raise OnboardingError(
                "--object-store local:<root> needs a directory, e.g. local:/srv/fl"
            )
        return ObjectStoreSettings(kind="local", root=root.resolve()), "local directory"
    if spec != "s3":
        raise OnboardingError(
            f"--object-store {spec!r}: use local:<directory> or s3 (with --endpoint and --bucket)"
        )
    missing = [
        flag for flag, value in (("--endpoint", endpoint), ("--bucket", bucket)) if not value
    ]
    if missing:
        raise OnboardingError(f"--object-store s3 needs {' and '.join(missing)}")
    found: dict[str, str] = {}
    sources: list[str] = []
    for key, name in (("access_key", ACCESS_KEY_ENV), ("secret_key", SECRET_KEY_ENV)):
        if environ.get(name):
            found[key] = environ[name]
    if found:
        sources.append("the environment")
    if secret_file is not None:
        found.update(read_secret_file(secret_file))
        sources.append(f"secret file {secret_file}")
    if len(found) == 1:
        lacking = "secret_key" if "access_key" in found else "access_key"
        raise OnboardingError(
            f"S3 credentials are incomplete: {lacking} is missing (set "
            f"{SECRET_KEY_ENV if lacking == 'secret_key' else ACCESS_KEY_ENV} or add it to "
            "the secret file)"
        )
    store = ObjectStoreSettings(
        kind="s3",
        endpoint=endpoint,
        bucket=bucket,
        region=region,
        secure=secure,
        access_key=found.get("access_key"),
        secret_key=SecretStr(found["secret_key"]) if "secret_key" in found else None,
    )
    if not found:
        return store, (
            f"no S3 keys given: the worker must have {ACCESS_KEY_ENV} and {SECRET_KEY_ENV} "
            "in its environment (or rerun with --secret-file)"
        )
    return store, f"S3 keys from {' and '.join(sources)}, stored in the site config (mode 0600)"


def describe_data_file(path: Path, data: DataConfig | None = None) -> str:
    """Read a data file the way a run will (or by its suffix) and describe it in a few words;
    a missing or unreadable file is an :class:`OnboardingError` naming it."""
    if not path.exists():
        raise OnboardingError(f"data file {path} does not exist")
    if not path.is_file():
        raise OnboardingError(f"data file {path} is not a file")
    suffix = path.suffix.lower()
    try:
        if data is not None and data.kind == "table":
            frame = read_table(path, data.loader)
            return f"table, {len(frame)} rows × {len(frame.columns)} columns"
        if data is not None or suffix == ".npz":
            arrays = read_array_file(path, data.loader if data else None)
            lacking = sorted({"features", "labels"} - set(arrays))
            if lacking:
                raise DataError(f"{path.name} lacks the arrays {lacking}")
            return f"arrays, {len(arrays['labels'])} examples"
        if suffix in TABLE_SUFFIXES:
            frame = read_table(path)
            return f"table, {len(frame)} rows × {len(frame.columns)} columns"
    except (DataError, ValueError, OSError) as exc:
        raise OnboardingError(f"unreadable data file: {exc}") from exc
    raise OnboardingError(
        f"{path.name}: fedround reads .npz, {', '.join(sorted(TABLE_SUFFIXES))}; for another "
        "format the federation names a data.loader: pass --federation-config so it is used"
    )


@dataclass(frozen=True)
class SiteInit:
    settings: SiteSettings
    path: Path
    data: dict[str, str]  # file name -> what it holds
    credentials: str
    key_id: str = ""  # the site's signing key: its public half, to register
    public_key: str = ""


def init_site(
    *,
    federation: str,
    site: str,
    train: Path,
    out: Path,
    store: ObjectStoreSettings,
    test: Path | None = None,
    federation_config: FederationConfig | None = None,
    work_pool: str | None = None,
    prefect_api_url: str | None = None,
    credentials: str = "",
    force: bool = False,
) -> SiteInit:
    """Write ``out`` (mode 0600) pointing at the operator's own data files."""
    if federation_config is not None and federation_config.federation != federation:
        raise OnboardingError(
            f"--federation {federation} does not match the federation config's "
            f"{federation_config.federation!r}"
        )
    if out.exists() and not force:
        raise OnboardingError(f"{out} exists: pass --force to overwrite it")
    data_config = federation_config.data if federation_config else None
    files = [train.resolve(), *([test.resolve()] if test else [])]
    described = {p.name: describe_data_file(p, data_config) for p in files}
    data_dir = Path(os.path.commonpath([p.parent for p in files]))
    try:
        settings = SiteSettings(
            site=site,
            federation=federation,
            data_dir=data_dir,
            train_file=os.path.relpath(files[0], data_dir),
            test_file=os.path.relpath(files[1], data_dir) if test else None,
            object_store=store,
            work_pool=work_pool,
            prefect_api_url=prefect_api_url,
            signing_key_file=out.with_name(f"{out.stem}{SIGNING_KEY_SUFFIX}").resolve(),
        )
    except ValidationError as exc:
        message = format_validation_error("site init", exc).replace("\n", "; ")
        raise OnboardingError(message) from None
    key = ensure_signing_key_file(settings)  # kept when it exists: re-init keeps the key
    write_site_settings(out, settings)
    return SiteInit(
        settings=settings,
        path=out,
        data=described,
        credentials=credentials,
        key_id=key.key_id,
        public_key=key.public_key,
    )


# --- site check --------------------------------------------------------------------------


class TensorInfo(BaseModel):
    name: str
    shape: list[int]
    dtype: str
    nbytes: int


class UpdatePreview(BaseModel):
    """The update the dry step produced, as the coordinator would receive it."""

    tensors: list[TensorInfo]
    payload_bytes: int = Field(description="the safetensors file uploaded")
    manifest_bytes: int
    manifest_fields: list[str]
    num_examples: int
    metrics: dict[str, float]
    parameters: int


class SiteCheckReport(BaseModel):
    """``fedround site check``: what a run would do at this site, rehearsed locally."""

    site: str
    federation: str
    ok: bool
    stage: str = Field(description="the last step reached: data, contract, model, training, …")
    error: str | None = None
    details: list[str] = Field(default_factory=list)
    data: dict[str, str] = Field(default_factory=dict)
    contract: ContractReport | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    update: UpdatePreview | None = None
    leaves: list[str] = Field(default_factory=list)
    stays: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Check:
    report: dict[str, Any] = field(default_factory=dict)
    stage: str = "settings"


def _setup_summary_lines(contract: ContractReport) -> list[str]:
    summary = contract.data_summary
    if summary is None:
        return []
    what = f"once per run, the set-up summary for federated preprocessing: {summary.rows} rows"
    lines = [what]
    if summary.numeric:
        lines.append(
            "set-up summary: count, sum, sum of squares, min and max of numeric columns "
            + ", ".join(summary.numeric)
        )
    for column, counts in summary.categories.items():
        lines.append(f"set-up summary: each category of {column!r} and its count ({len(counts)})")
    if summary.labels:
        lines.append(f"set-up summary: each label class and its count ({len(summary.labels)})")
    if summary.target is not None:
        lines.append("set-up summary: count, sum, sum of squares, min and max of the target")
    return lines


def _load_inputs(
    site_config: Path, federation_config: Path
) -> tuple[SiteSettings, FederationConfig, dict[str, Any]]:
    settings = load_site_settings(site_config)
    config = load_federation_config(federation_config)
    if settings.federation != config.federation:
        raise OnboardingError(
            f"{site_config} is for federation {settings.federation!r}, "
            f"{federation_config} configures {config.federation!r}"
        )
    suite_path = federation_config.parent / config.contract
    try:
        suite = json.loads(suite_path.read_text())
    except OSError as exc:
        raise OnboardingError(
            f"cannot read the federation's contract {suite_path}: {exc.strerror}"
        ) from exc
    except json.JSONDecodeError as exc:
        raise OnboardingError(f"contract {suite_path} is not valid JSON: {exc}") from exc
    return settings, config, suite


def check_site(site_config: Path, federation_config: Path) -> SiteCheckReport:
    """Rehearse a run at this site; never raises for the site's own problems (they are the
    report's ``error``), only for bugs."""
    started = time.perf_counter()
    state = _Check()
    site, federation = "?", "?"
    try:
        settings, config, suite = _load_inputs(site_config, federation_config)
        site, federation = settings.site, settings.federation
        _rehearse(settings, config, suite, state)
    except OnboardingError as exc:
        state.report.update(error=str(exc), details=exc.details)
    except (FedroundError, DataError) as exc:  # config, user code, suite, data shape
        state.report.update(error=f"{_kind(exc)}: {exc}".replace("\n", "; "))
    report = SiteCheckReport(
        site=site,
        federation=federation,
        ok="error" not in state.report,
        stage=state.stage,
        seconds=time.perf_counter() - started,
        **state.report,
    )
    return report


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(exc: Exception) -> str:
    return {
        "ConfigError": "configuration",
        "UserCodeError": "user code",
        "ContractError": "data contract",
        "DataError": "data",
    }.get(type(exc).__name__, type(exc).__name__)


def _rehearse(
    settings: SiteSettings, config: FederationConfig, suite: dict[str, Any], state: _Check
) -> None:
    from .contract import check_site_contract

    report = state.report
    notes: list[str] = report.setdefault("notes", [])
    if settings.site not in {s.name for s in config.sites}:
        notes.append(
            f"site {settings.site} is not listed in {config.federation}'s sites yet: the "
            "coordinator adds it to the federation config"
        )
    state.stage = "data"
    files = [("train_file", settings.train_path)]
    if settings.test_path is not None:
        files.append(("test_file", settings.test_path))
    for what, path in files:
        if not path.exists():
            hint = " (or test_file: null if the site holds none)" if what == "test_file" else ""
            raise OnboardingError(
                f"data file {path} does not exist: check data_dir and {what} in site.yaml{hint}"
            )
    report["data"] = {
        what: f"{path.name} ({describe_data_file(path, config.data)})" for what, path in files
    }

    state.stage = "contract"
    contract = check_site_contract(settings.train_path, suite, settings.site, config.data)
    report["contract"] = contract
    if not contract.success:
        unreadable = [r for r in contract.failures if r.rule == "readable_data"]
        if unreadable:
            raise OnboardingError(f"unreadable data file: {unreadable[0].error}")
        raise OnboardingError(
            f"data contract {contract.suite!r} fails: {len(contract.failures)} of "
            f"{len(contract.results)} rules broken",
            [_shorten(r.describe()) for r in contract.failures],
        )
    _dry_step(settings, config, contract, state)


def _dry_step(
    settings: SiteSettings, config: FederationConfig, contract: ContractReport, state: _Check
) -> None:
    """Build the model, train one batch, and check the update as the coordinator would."""
    import torch

    from fedround.tasks.core.hooks import apply_update_hooks, hooks_for
    from fedround.tasks.core.manifest import UpdateManifest
    from fedround.tasks.core.models import build_model
    from fedround.tasks.core.preprocessing import bound_summary, merge_summaries
    from fedround.tasks.core.serialization import sha256_hex, weights_to_bytes
    from fedround.tasks.core.signing import sign_manifest
    from fedround.tasks.core.usercode import RoundContext, SiteDataset, resolve_model_config
    from fedround.tasks.core.validation import UpdateExpectation, tensor_specs, validate_update

    from .data import load_dataset
    from .training import train_locally

    report = state.report
    notes: list[str] = report["notes"]
    preprocessor = None
    table = config.data.table
    if config.data.kind == "table" and table is not None:
        state.stage = "preprocessing"
        if contract.data_summary is None:
            raise OnboardingError("the data contract passed but sent no set-up summary")
        try:
            preprocessor = merge_summaries(
                [bound_summary(contract.data_summary, table, contract.row_count)], table
            )
        except ValueError as exc:
            raise OnboardingError(f"preprocessing this site's table: {exc}") from exc
        notes.append(
            "the dry step preprocessed with this site's own summary only; in a run the "
            "statistics (means, deviations, categories, classes) are merged across all sites"
        )
    state.stage = "model"
    model_config = resolve_model_config(
        config.model,
        preprocessor.n_features if preprocessor else None,
        preprocessor.n_outputs if preprocessor else None,
    )
    model = build_model(model_config, seed=config.seed)
    global_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    report["model"] = {
        "factory": model_config.import_path,
        "arguments": model_config.kwargs,
        "parameters": sum(t.numel() for t in global_weights.values()),
    }

    state.stage = "training"
    torch.set_num_threads(settings.threads)  # as a round at this site would
    data = load_dataset(settings.train_path, config.data, preprocessor)
    if not len(data):
        raise OnboardingError(f"{settings.train_path.name} has no usable rows (labels missing?)")
    batch = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))
    batch = batch[: config.training.batch_size]
    one_batch = SiteDataset(
        data.features[batch],
        data.labels[batch],
        task=data.task,
        num_classes=data.num_classes,
        feature_names=data.feature_names,
    )
    context = RoundContext(
        federation=config.federation,
        run_id=DRY_RUN_ID,
        site=settings.site,
        round=1,
        seed=config.seed,
        task=data.task,
        num_classes=data.num_classes,
        extra={"data_path": str(settings.train_path), "dry_run": True},
    )
    hooks = hooks_for(config.strategy, global_weights)
    local = train_locally(
        model, one_batch, config.training.model_copy(update={"local_epochs": 1}), context, hooks
    )

    state.stage = "update"
    delta = {name: local.weights[name] - global_weights[name] for name in global_weights}
    delta = apply_update_hooks(hooks, delta)
    payload = weights_to_bytes(delta)
    manifest = UpdateManifest(
        federation=config.federation,
        run_id=DRY_RUN_ID,
        round=1,
        site=settings.site,
        nonce=DRY_RUN_ID,
        num_examples=local.num_examples,
        sha256=sha256_hex(payload),
        nbytes=len(payload),
        metrics={**local.metrics, "train_seconds": local.seconds},
    )
    signing_key = load_signing_key(settings)
    if signing_key is None:
        notes.append(
            "this site has no signing key: a coordinator that requires signatures (the "
            "default) rejects its updates; `fedround site init` or `fedround keys rotate` "
            "makes one"
        )
    else:
        manifest = sign_manifest(manifest, signing_key)
    expected = UpdateExpectation(
        federation=config.federation,
        run_id=DRY_RUN_ID,
        round=1,
        nonce=DRY_RUN_ID,
        site=settings.site,
        specs=tensor_specs(global_weights),
        max_bytes=config.limits.max_update_bytes,
        max_num_examples=contract.row_count,
        max_norm=config.limits.max_update_norm,
    )
    try:
        validate_update(manifest, payload, expected)
    except UpdateRejected as exc:
        raise OnboardingError(f"the coordinator would reject this site's update: {exc}") from exc
    report["update"] = UpdatePreview(
        tensors=[
            TensorInfo(
                name=name,
                shape=list(t.shape),
                dtype=str(t.dtype).removeprefix("torch."),
                nbytes=t.numel() * t.element_size(),
            )
            for name, t in delta.items()
        ],
        payload_bytes=len(payload),
        manifest_bytes=len(manifest.to_json()),
        manifest_fields=sorted(manifest.model_dump()),
        num_examples=local.num_examples,
        metrics=manifest.metrics,
        parameters=report["model"]["parameters"],
    )
    rows = contract.row_count
    report["leaves"] = [
        f"each round: the update ({len(delta)} tensors, {len(payload):,} bytes of safetensors) "
        f"and its manifest ({', '.join(sorted(manifest.model_dump()))})",
        f"each round: the example count (at most the {rows:,} rows the contract checked) and "
        f"the training metrics ({', '.join(sorted(manifest.metrics))})",
        f"once per run: the data contract's outcome: {len(contract.results)} rules, passed or "
        "failed, with counts of offending rows (never their values)",
        *_setup_summary_lines(contract),
        "on promotion: evaluation metrics on the held-out file (numbers only)",
    ]
    names = [settings.train_path.name]
    if settings.test_path is not None:
        names.append(settings.test_path.name)
    report["stays"] = [
        f"the rows of {' and '.join(names)} ({rows:,} training rows)",
        "the files' paths and the data folder (an unreadable file's error names the file)",
        "site.yaml and its object-store credentials",
    ]
