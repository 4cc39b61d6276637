"""The MLflow model registry of a federation: versions, aliases, lineage tags, integrity.

Every finished training run registers its global model as a new version of the
federation's registered model (``<federation>-global`` by default) with alias
``candidate``. The logged model is a pyfunc model that serves raw inputs, preprocessing
included (``mlflow.pyfunc.load_model("models:/<name>@candidate").predict(rows)``; see
:mod:`fedround.tasks.serving`). Its folder holds the exact global weights
(``data/fedround/weights.safetensors``), the model config and, for tables, the federation's
preprocessor, so a version can be verified and evaluated without unpickling anything.
Version tags:

- lineage: ``fedround.run_id``, ``fedround.federation``, ``fedround.tenant``, config
  revision, ``fedround.sites``, ``fedround.rounds``, ``fedround.accuracy``, ...;
- integrity: ``fedround.weights_sha256`` (the checkpoint's digest),
  ``fedround.preprocessing_sha256`` (tables) and ``fedround.artifacts_sha256`` (the files
  of the logged model, less the bookkeeping MLflow writes into it: see
  :data:`MLFLOW_BOOKKEEPING`);
- version: ``fedround.semver`` (see :mod:`fedround.tasks.core.semver`),
  ``fedround.semver_change``, ``fedround.parent_version`` for a fine-tuned model;
- lifecycle: ``fedround.status`` (candidate, canary, production, deprecated, rejected,
  rolled_back) and, after a promotion attempt, the gates' figures.

Aliases: ``candidate``, ``production``, ``deprecated`` (the previous production) and
``production-<site>`` during a staged rollout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedround.tasks.core.config import FederationConfig, ModelConfig
from fedround.tasks.core.errors import FedroundError
from fedround.tasks.core.models import build_model
from fedround.tasks.core.preprocessing import Preprocessor
from fedround.tasks.core.semver import SemVer, bump
from fedround.tasks.core.serialization import Weights, sha256_hex, weights_to_bytes
from fedround.tasks.tracking import grant_promoters

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from fedround.tasks.tracking import RunTracker

log = logging.getLogger(__name__)

TAG = "fedround."
CANDIDATE = "candidate"
PRODUCTION = "production"
DEPRECATED = "deprecated"
HISTORY_TAG = f"{TAG}production_history"
WEIGHTS_FILE = "weights.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
PREPROCESSING_FILE = "preprocessing.json"
LOGGED_MODEL_NAME = "global-model"
# Files MLflow itself writes into a logged model's folder after it was logged, which the
# artifacts digest therefore leaves out (by name, at the folder's top level only; every
# other file counts, the weights included):
# - ``registered_model_meta``: written by ``mlflow.pyfunc.load_model("models:/...")`` into
#   the model's folder (in place, on a local artifact store: the embedded default) with
#   the registered name and version it was loaded as.
MLFLOW_BOOKKEEPING = frozenset({"registered_model_meta"})
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class RegistryError(FedroundError):
    """A registry entry is missing, ambiguous, or fails its integrity check."""


@dataclass(frozen=True)
class RegisteredModel:
    """A version registered by a training run: ``uri`` is ``models:/<name>/<version>``."""

    name: str
    version: str
    uri: str
    alias: str


def site_alias(site: str) -> str:
    """The per-site (per-tenant) alias used during a staged rollout."""
    return f"{PRODUCTION}-{site}"


def quiet_downloads() -> None:
    """No artifact-download progress bars on the terminal (the user can still turn them on)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _digest_tree(root: Path) -> str:
    """One SHA-256 over every file of the logged model under ``root`` (relative path and
    content), except MLflow's own bookkeeping files (:data:`MLFLOW_BOOKKEEPING`)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative in MLFLOW_BOOKKEEPING:
            continue
        digest.update(relative.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class VerifiedModel:
    """A registered version whose artifacts passed their digest checks: its weights, the
    model config it was built with and, for a table model, its preprocessor."""

    name: str
    version: str
    weights_bytes: bytes
    weights_sha256: str
    model_config: ModelConfig
    tags: dict[str, str]
    preprocessor: Preprocessor | None = None

    @property
    def preprocessing_bytes(self) -> bytes | None:
        """The preprocessor as published to sites (its digest is ``preprocessor.sha256()``)."""
        return self.preprocessor.model_dump_json().encode() if self.preprocessor else None

    @property
    def semver(self) -> str | None:
        return self.tags.get(f"{TAG}semver")


class ModelRegistry:
    """One registered model (a federation's global model) in MLflow's registry."""

    def __init__(self, tracking_uri: str, name: str) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.name = name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # --- reading ----------------------------------------------------------------------

    def exists(self) -> bool:
        return bool(self.client.search_registered_models(f"name = '{self.name}'"))

    def versions(self) -> list[ModelVersion]:
        if not self.exists():
            return []
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(found, key=lambda v: int(v.version))

    def aliases(self) -> dict[str, str]:
        if not self.exists():
            return {}
        return {a: str(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}

    def model_tags(self) -> dict[str, str]:
        if not self.exists():
            return {}
        return dict(self.client.get_registered_model(self.name).tags)

    def get(self, version: str) -> ModelVersion:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException:
            raise RegistryError(f"model {self.name} has no version {version}") from None

    def by_alias(self, alias: str) -> ModelVersion | None:
        version = self.aliases().get(alias)
        return self.get(version) if version is not None else None

    def resolve(self, ref: str) -> ModelVersion:
        """``7``, ``@production``, ``models:/<name>/7`` or ``models:/<name>@production``."""
        match = _MODEL_URI.match(ref)
        if match:
            if match.group("name") != self.name:
                raise RegistryError(f"{ref} names model {match.group('name')}, not {self.name}")
            version, alias = match.group("version"), match.group("alias")
        elif ref.startswith("@"):
            version, alias = None, ref[1:]
        else:
            version, alias = ref, None
        if version is not None:
            return self.get(version)
        found = self.by_alias(str(alias))
        if found is None:
            raise RegistryError(f"model {self.name} has no version with alias {alias!r}")
        return found

    def semvers(self) -> dict[str, SemVer]:
        found = {}
        for v in self.versions():
            text = v.tags.get(f"{TAG}semver")
            if text:
                try:
                    found[str(v.version)] = SemVer.parse(text)
                except ValueError:
                    log.warning("%s v%s has a malformed semver tag %r", self.name, v.version, text)
        return found

    # --- integrity --------------------------------------------------------------------

    def download(self, version: str, destination: Path) -> Path:
        """A version's model files, downloaded into ``destination``."""
        import mlflow.artifacts

        quiet_downloads()
        location = self.client.get_model_version_download_uri(self.name, str(version))
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(destination), tracking_uri=self.tracking_uri
            )
        )

    def verify(self, version: str) -> VerifiedModel:
        """Download a version's artifacts and check them against its digest tags."""

        quiet_downloads()
        entry = self.get(version)
        tags = dict(entry.tags)
        label = f"{self.name} version {version}"
        expected = tags.get(f"{TAG}weights_sha256")
        if not expected:
            raise RegistryError(
                f"{label} has no {TAG}weights_sha256 tag: it was not registered by fedround "
                "(or the tag was removed), so its integrity cannot be checked; refusing it"
            )
        with tempfile.TemporaryDirectory(prefix="fedround-verify-") as tmp:
            try:
                local = self.download(version, Path(tmp))
            except Exception as exc:
                raise RegistryError(
                    f"{label}: its artifacts cannot be downloaded ({type(exc).__name__}: "
                    f"{str(exc)[:300]}); they may have been deleted. Refusing it."
                ) from exc
            weights_file = next(iter(local.rglob(WEIGHTS_FILE)), None)
            config_file = next(iter(local.rglob(MODEL_CONFIG_FILE)), None)
            if weights_file is None or config_file is None:
                missing = WEIGHTS_FILE if weights_file is None else MODEL_CONFIG_FILE
                raise RegistryError(
                    f"{label}: artifact {missing} is missing from {entry.source}. Refusing it."
                )
            payload = weights_file.read_bytes()
            actual = sha256_hex(payload)
            if actual != expected:
                raise RegistryError(
                    f"{label} fails its digest check: {WEIGHTS_FILE} has sha256 "
                    f"{actual[:12]}…, the version's {TAG}weights_sha256 tag says "
                    f"{expected[:12]}…. The artifact was altered; refusing it."
                )
            recorded = tags.get(f"{TAG}artifacts_sha256")
            if recorded and _digest_tree(local) != recorded:
                raise RegistryError(
                    f"{label} fails its digest check: the files of the logged model changed "
                    f"since registration ({TAG}artifacts_sha256 {recorded[:12]}…). Refusing it."
                )
            model_config = ModelConfig.model_validate_json(config_file.read_text())
            preprocessor = _verified_preprocessor(label, local, tags)
        return VerifiedModel(
            self.name, str(version), payload, actual, model_config, tags, preprocessor
        )

    # --- writing ----------------------------------------------------------------------

    def set_tags(self, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, str(value)[:5000])

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        if alias in self.aliases():
            self.client.delete_registered_model_alias(self.name, alias)

    def production_history(self) -> list[str]:
        text = self.model_tags().get(HISTORY_TAG)
        return [str(v) for v in json.loads(text)] if text else []

    def set_production_history(self, versions: list[str]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(versions))


def _verified_preprocessor(label: str, local: Path, tags: dict[str, str]) -> Preprocessor | None:
    """A version's preprocessor, checked against its ``preprocessing_sha256`` tag: present
    exactly when the tag is."""
    from fedround.tasks.serving import read_preprocessor

    expected = tags.get(f"{TAG}preprocessing_sha256")
    found = next(iter(local.rglob(PREPROCESSING_FILE)), None)
    if found is None:
        if expected:
            raise RegistryError(
                f"{label}: artifact {PREPROCESSING_FILE} is missing, yet the version records "
                f"a preprocessor ({TAG}preprocessing_sha256). Refusing it."
            )
        return None
    if not expected:
        raise RegistryError(
            f"{label} carries {PREPROCESSING_FILE} but no {TAG}preprocessing_sha256 tag to "
            "check it against. Refusing it."
        )
    try:
        preprocessor = read_preprocessor(found)
    except ValueError as exc:
        raise RegistryError(f"{label}: {PREPROCESSING_FILE} is not a preprocessor: {exc}") from None
    if preprocessor.sha256() != expected:
        raise RegistryError(
            f"{label} fails its digest check: {PREPROCESSING_FILE} has sha256 "
            f"{preprocessor.sha256()[:12]}…, the version's {TAG}preprocessing_sha256 tag says "
            f"{expected[:12]}…. Refusing it."
        )
    return preprocessor


# --- registration --------------------------------------------------------------------


def _reference(
    registry: ModelRegistry, parent: str | None
) -> tuple[tuple[SemVer, dict[str, Any]] | None, str]:
    """The version a new one is compared with: its parent, production, or the newest."""
    candidates: list[tuple[str, str | None]] = [
        ("parent", parent),
        (PRODUCTION, registry.aliases().get(PRODUCTION)),
    ]
    semvers = registry.semvers()
    if semvers:
        newest = max(semvers, key=lambda v: semvers[v])
        candidates.append(("newest", newest))
    for why, version in candidates:
        if version is None or version not in semvers:
            continue
        text = registry.get(version).tags.get(f"{TAG}model_config")
        if text:
            return (semvers[version], json.loads(text)), f"{why} v{version}"
    return None, "none"


def _assign_semver(
    registry: ModelRegistry, version: str, model_config: dict[str, Any], parent: str | None
) -> dict[str, str]:
    """Pick the semantic version of a new ``version`` and tag it.

    Optimistic and race-free without a lock: MLflow numbers versions atomically, so if two
    registrations pick the same semantic version, the higher-numbered one sees the clash
    and picks again, while the lower-numbered one keeps its pick.
    """
    for _ in range(20):
        reference, why = _reference(registry, parent)
        existing = [s for v, s in registry.semvers().items() if v != version]
        chosen = bump(existing, model_config, reference, fine_tuned=parent is not None)
        tags = {
            f"{TAG}semver": str(chosen.version),
            f"{TAG}semver_change": chosen.change.value,
            f"{TAG}semver_reason": f"{chosen.reason} (compared with {why})",
        }
        registry.set_tags(version, tags)
        clash = [
            v
            for v, s in registry.semvers().items()
            if s == chosen.version and int(v) < int(version)
        ]
        if not clash:
            return tags
    raise RegistryError(f"could not assign a unique semantic version to {registry.name} v{version}")


def registered_by_run(tracker: RunTracker) -> RegisteredModel | None:
    """The version this training run already registered (when a finished run is re-run):
    :func:`register_candidate` records it in the run's tags."""
    tags = tracker.client.get_run(tracker.mlflow_run_id).data.tags
    name, version = tags.get(f"{TAG}model_name"), tags.get(f"{TAG}model_version")
    if not name or not version:
        return None
    return RegisteredModel(name, version, f"models:/{name}/{version}", CANDIDATE)


def register_candidate(
    tracker: RunTracker,
    config: FederationConfig,
    weights: Weights,
    version_tags: dict[str, str],
    parent: str | None = None,
    model_config: ModelConfig | None = None,
    preprocessor: Preprocessor | None = None,
) -> RegisteredModel:
    """Log the global model and register it as a new version with alias ``candidate``.

    ``parent`` is the version training started from (``--init-from``), if any;
    ``model_config`` the model as the run built it (defaults to the config's);
    ``preprocessor`` the run's federated preprocessor (tables), which the logged model
    applies to raw rows. The logged model is a pyfunc model with a signature and an input
    example (see :mod:`fedround.tasks.serving`).
    """
    import mlflow

    from fedround.tasks import serving

    quiet_downloads()
    registry = ModelRegistry(tracker.tracking_uri, config.model_name)
    built = model_config or config.model
    model = build_model(built, seed=0)
    model.load_state_dict(weights)
    model.eval()
    payload = weights_to_bytes(weights)
    model_config_json = built.model_dump(mode="json")
    example: Any
    if preprocessor is not None:
        signature, example = (
            serving.table_signature(preprocessor),
            serving.table_example(preprocessor),
        )
    else:
        signature, example = serving.array_signature(model, serving.array_features(built, model))
    mlflow.set_tracking_uri(tracker.tracking_uri)
    mlflow.set_registry_uri(tracker.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="fedround-register-") as tmp:
        data, settings = serving.write_model_data(Path(tmp), payload, built, preprocessor)
        with mlflow.start_run(run_id=tracker.mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name=LOGGED_MODEL_NAME,
                loader_module=serving.LOADER_MODULE,
                data_path=str(data),
                model_config=settings,
                signature=signature,
                input_example=example,
                pip_requirements=serving.pip_requirements(built),
            )
    if not registry.exists():
        from mlflow.exceptions import MlflowException

        made = False
        with contextlib.suppress(MlflowException):  # created concurrently by another run
            registry.client.create_registered_model(config.model_name)
            made = True
        if made:  # its creator holds MANAGE on it: the one that may let promoters in
            grant_promoters(
                tracker.tracking_uri, config.registry.promoters, None, config.model_name
            )
    if version_tags.get(f"{TAG}weights_sha256", sha256_hex(payload)) != sha256_hex(payload):
        log.warning("the registered weights differ from the checkpoint the run reported")
    tags = {
        f"{TAG}federation": config.federation,
        f"{TAG}tenant": config.tenant,
        f"{TAG}model_config": json.dumps(model_config_json, sort_keys=True),
        f"{TAG}status": CANDIDATE,
        **version_tags,
        f"{TAG}weights_sha256": sha256_hex(payload),
    }
    if preprocessor is not None:
        tags[f"{TAG}preprocessing_sha256"] = preprocessor.sha256()
    if parent is not None:
        tags[f"{TAG}parent_version"] = parent
    created = registry.client.create_model_version(
        config.model_name,
        source=info.model_uri,
        run_id=tracker.mlflow_run_id,
        tags=tags,
        model_id=info.model_id,
    )
    version = str(created.version)
    semver = _assign_semver(registry, version, model_config_json, parent)
    with tempfile.TemporaryDirectory(prefix="fedround-digest-") as tmp:
        local = registry.download(version, Path(tmp))
        registry.set_tags(version, {f"{TAG}artifacts_sha256": _digest_tree(local)})
    registry.set_alias(CANDIDATE, version)
    tracker.set_tags(
        {
            f"{TAG}model_name": config.model_name,
            f"{TAG}model_version": version,
            f"{TAG}model_semver": semver[f"{TAG}semver"],
        }
    )
    log.info(
        "registered %s version %s (%s) as %r",
        config.model_name,
        version,
        semver[f"{TAG}semver"],
        CANDIDATE,
    )
    return RegisteredModel(
        config.model_name, version, f"models:/{config.model_name}/{version}", CANDIDATE
    )
