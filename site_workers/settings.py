"""A site's own settings file. It stays at the site: data path and credentials live here."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedround.tasks.core.config import Name, format_validation_error
from fedround.tasks.core.errors import ConfigError
from fedround.tasks.object_store import ObjectStoreSettings


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
    threads: int = Field(1, ge=1, description="torch threads for local training")
    work_pool: str | None = Field(None, description="defaults to '<federation>-<site>'")
    prefect_api_url: str | None = Field(None, description="defaults to $PREFECT_API_URL")

    @property
    def pool(self) -> str:
        return self.work_pool or f"{self.federation}-{self.site}"

    @property
    def site_state_dir(self) -> Path:
        return self.state_dir or self.data_dir / ".fedround-state"

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
    return settings.model_copy(update=update)


def write_site_settings(path: Path, settings: SiteSettings) -> None:
    """Write a site config, readable by its owner only (it may hold the site's S3 secret)."""
    data = settings.model_dump(mode="json", exclude_none=True)
    if settings.test_file is None:
        data["test_file"] = None  # explicit: left out, it would read back as test.npz
    secret = settings.object_store.secret_key
    if secret is not None:
        data["object_store"]["secret_key"] = secret.get_secret_value()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(yaml.safe_dump(data))
