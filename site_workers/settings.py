"""A site's own settings file. It stays at the site: data path and credentials live here.

Loading it refuses placeholder or missing S3 keys (in the file or, as its fallback, in
``FEDROUND_S3_ACCESS_KEY`` / ``FEDROUND_S3_SECRET_KEY``) unless the file says
``insecure_dev: true`` or ``FEDROUND_INSECURE_DEV=1`` is set. Under
``FEDROUND_PROFILE=production`` it also refuses a Prefect or S3 link without
authentication or TLS (:mod:`fedround.tasks.control_plane`), on the same terms.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedround.tasks.control_plane import Links, require_secure_links
from fedround.tasks.core.config import Name, format_validation_error
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.core.signing import RegisteredKey
from fedround.tasks.object_store import ObjectStoreSettings
from fedround.tasks.runtime import (
    INSECURE_DEV_ENV,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    Credential,
    insecure_dev_from_env,
    optional_client_credentials,
    refuse_placeholder_credentials,
    url_password,
)


class SiteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: Name
    federation: Name
    data_dir: Path = Field(description="folder holding the site's data files")
    train_file: str = Field(
        "train.npz", description="the training file in data_dir (.npz, .parquet, .csv)"
    )
    test_file: str | None = Field(
        "test.npz", description="the held-out file in data_dir for federated evaluation"
    )
    object_store: ObjectStoreSettings
    state_dir: Path | None = Field(
        None,
        description="where the site keeps its own strategy state across rounds and restarts "
        "(SCAFFOLD's control variate, compression residuals); defaults to "
        "<data_dir>/.fedround-state",
    )
    signing_key_file: Path | None = Field(
        None,
        description="the site's Ed25519 private key (mode 0600; $FEDROUND_SITE_SIGNING_KEY "
        "takes precedence); defaults to <state_dir>/signing.key",
    )
    peer_keys_file: Path | None = Field(
        None,
        description="the federation's site keys as `fedround keys export` writes them: with "
        "secure aggregation the site checks every other site's key advert against them "
        "(otherwise it trusts the coordinator to relay the adverts faithfully)",
    )
    dispatch_keys: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="the public dispatch keys of the federation's coordinator (`fedround keys "
        "dispatch`): when set, the site's worker runs only flow runs sealed with one of them; "
        "when empty, it trusts the keys the coordinator publishes under the federation's "
        "read-only prefix",
    )
    threads: int = Field(1, ge=1, description="torch threads for local training")
    work_pool: str | None = Field(None, description="defaults to '<federation>-<site>'")
    prefect_api_url: str | None = Field(None, description="defaults to $PREFECT_API_URL")
    insecure_dev: bool = Field(
        False,
        description="accept placeholder or missing credentials (REPLACE_ME, changeme, "
        "minioadmin, ...) with a warning at every start: throw-away local setups only",
    )

    @field_validator("dispatch_keys")
    @classmethod
    def _public_keys(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                RegisteredKey.from_text(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return values

    @property
    def pool(self) -> str:
        return self.work_pool or f"{self.federation}-{self.site}"

    @property
    def site_state_dir(self) -> Path:
        return self.state_dir or self.data_dir / ".fedround-state"

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key_file or self.site_state_dir / "signing.key"

    @property
    def train_path(self) -> Path:
        return self.data_dir / self.train_file

    @property
    def test_path(self) -> Path | None:
        return self.data_dir / self.test_file if self.test_file else None


def load_site_settings(path: Path) -> SiteSettings:
    """Read a site config; relative paths in it are relative to the file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read site config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        settings = SiteSettings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from exc
    base = path.parent
    store = settings.object_store
    if store.root is not None and not store.root.is_absolute():
        store = store.model_copy(update={"root": (base / store.root).resolve()})
    data_dir = settings.data_dir if settings.data_dir.is_absolute() else base / settings.data_dir
    update: dict[str, object] = {"data_dir": data_dir.resolve(), "object_store": store}
    if settings.state_dir is not None and not settings.state_dir.is_absolute():
        update["state_dir"] = (base / settings.state_dir).resolve()
    if settings.signing_key_file is not None and not settings.signing_key_file.is_absolute():
        update["signing_key_file"] = (base / settings.signing_key_file).resolve()
    refuse_placeholder_site_credentials(settings, path)
    require_secure_site_links(settings, path)
    return settings.model_copy(update=update)


def site_credentials(settings: SiteSettings, path: Path) -> list[Credential]:
    """The credentials a site with these settings uses, each named by where it comes from:
    the S3 keys of the file or, as the object store does, ``FEDROUND_S3_*`` in their place."""
    credentials: list[Credential] = []
    store = settings.object_store
    if store.kind == "s3":
        secret = store.secret_key.get_secret_value() if store.secret_key else None
        for field, value, env in (
            ("access_key", store.access_key, S3_ACCESS_KEY_ENV),
            ("secret_key", secret, S3_SECRET_KEY_ENV),
        ):
            if value:
                credentials.append(Credential(f"object_store.{field} in {path}", value))
            elif env in os.environ:
                credentials.append(Credential(env, os.environ[env]))
            else:
                credentials.append(Credential(f"object_store.{field} (or {env})", None))
    credentials.append(
        Credential("the password in prefect_api_url", url_password(settings.prefect_api_url), False)
    )
    return credentials + optional_client_credentials()


def refuse_placeholder_site_credentials(settings: SiteSettings, path: Path) -> None:
    """Raise :class:`ConfigError` if the site would use placeholder or missing credentials,
    unless ``insecure_dev: true`` in its file or ``FEDROUND_INSECURE_DEV=1`` (a warning then)."""
    refuse_placeholder_credentials(
        site_credentials(settings, path),
        who=f"site {settings.site} ({path})",
        insecure_dev=settings.insecure_dev or insecure_dev_from_env(),
        override=f"insecure_dev: true in {path} or {INSECURE_DEV_ENV}=1",
    )


def require_secure_site_links(settings: SiteSettings, path: Path) -> None:
    """Under ``FEDROUND_PROFILE=production``, refuse a site whose Prefect or S3 link has no
    authentication or TLS (:mod:`fedround.tasks.control_plane`), unless insecure dev mode."""
    store = settings.object_store
    require_secure_links(
        Links(
            prefect_api_url=settings.prefect_api_url or os.environ.get("PREFECT_API_URL", ""),
            mlflow_tracking_uri=None,  # sites never talk to MLflow
            s3_secure=store.secure if store.kind == "s3" else None,
        ),
        who=f"site {settings.site} ({path})",
        insecure_dev=settings.insecure_dev or insecure_dev_from_env(),
        override=f"insecure_dev: true in {path} or {INSECURE_DEV_ENV}=1",
    )


def write_site_settings(path: Path, settings: SiteSettings) -> None:
    """Write a site config, readable by its owner only (it may hold the site's S3 secret)."""
    data = settings.model_dump(mode="json", exclude_none=True)
    if settings.test_file is None:
        data["test_file"] = None  # explicit: left out, it would read back as test.npz
    if not settings.insecure_dev:
        del data["insecure_dev"]  # only ever written when someone asked for it
    secret = settings.object_store.secret_key
    if secret is not None:
        data["object_store"]["secret_key"] = secret.get_secret_value()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(data))
