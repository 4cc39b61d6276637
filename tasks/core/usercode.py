"""The user's code behind a federation: model factory, training and evaluation functions.

A federation names them by import path (``package.module:function``), from an ordinary
installed package, at the coordinator and at every site. This module is the boundary:
whatever the user's code raises or returns, fedround turns it into one
:class:`UserCodeError` that names the function and what went wrong, and never lets a bad
value (a non-module, NaN metrics, NaN weights) past it.

The signatures (documented for users in :mod:`fedround.api`)::

    factory(**kwargs) -> torch.nn.Module
    train(model, data: SiteDataset, settings: TrainingConfig, context: RoundContext)
        -> Mapping[str, float]                       # metrics; the model is trained in place
    evaluate(model, data: SiteDataset, context: RoundContext) -> Mapping[str, float]
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from .config import ModelConfig, TrainingConfig
from .errors import FedroundError

MAX_METRICS = 64
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")


class UserCodeError(FedroundError):
    """The user's model, data loader, training or evaluation function failed; the message
    names the function. The site is left out of the round; nothing else is affected."""


@dataclass(frozen=True)
class SiteDataset:
    """A site's examples, ready for a model: what ``train`` and ``evaluate`` receive.

    ``features`` is float32 (n × d; for tables, after the federation's preprocessing),
    ``labels`` int64 class indices (classification) or float32 targets (regression).
    """

    features: torch.Tensor
    labels: torch.Tensor
    task: Literal["classification", "regression"] = "classification"
    num_classes: int | None = None
    feature_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, shuffle: bool = True, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of (features, labels), shuffled reproducibly by ``seed``."""
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            if shuffle
            else torch.arange(n)
        )
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            yield self.features[batch], self.labels[batch]


@dataclass(frozen=True)
class RoundContext:
    """Where and when a site's training runs. ``seed`` is derived from the federation's seed,
    the round and the site: use it for any randomness so runs are reproducible."""

    federation: str
    run_id: str
    site: str
    round: int
    seed: int
    task: Literal["classification", "regression"] = "classification"
    num_classes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TrainFunction(Protocol):
    def __call__(
        self, model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
    ) -> Mapping[str, float]: ...


class EvaluateFunction(Protocol):
    def __call__(
        self, model: nn.Module, data: SiteDataset, context: RoundContext
    ) -> Mapping[str, float]: ...


def load_callable(path: str, role: str) -> Callable[..., Any]:
    """Import ``package.module:attribute`` (the user's ``role`` function)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise UserCodeError(f"{role} {path!r}: expected 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserCodeError(
            f"{role} {path}: cannot import module {module_name!r} ({exc}); install the "
            "package that provides it here (pip install ...), at the coordinator and every site"
        ) from exc
    except (Exception, SystemExit) as exc:
        raise UserCodeError(
            f"{role} {path}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserCodeError(f"{role} {path}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserCodeError(f"{role} {path}: {attribute!r} is not callable")
    return target  # type: ignore[no-any-return]


def accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` can be called with keyword ``name``."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def resolve_model_config(
    config: ModelConfig, in_features: int | None, out_features: int | None
) -> ModelConfig:
    """Fill ``in_features``/``out_features`` (known after the federated set-up) when the
    factory accepts them and the config does not set them."""
    factory = load_callable(config.import_path, "model factory")
    extra: dict[str, Any] = {}
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if value is not None and name not in config.kwargs and accepts_keyword(factory, name):
            extra[name] = value
    return config.with_kwargs(**extra) if extra else config


def build_user_model(config: ModelConfig, seed: int) -> nn.Module:
    """Call the model factory with its keyword arguments under a fixed seed."""
    path = config.import_path
    factory = load_callable(path, "model factory")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(**config.kwargs)
    except (Exception, SystemExit) as exc:
        raise UserCodeError(
            f"model factory {path}({_args(config.kwargs)}) raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise UserCodeError(
            f"model factory {path} returned {type(model).__name__}, not a torch.nn.Module"
        )
    if not any(True for _ in model.parameters()):
        raise UserCodeError(f"model factory {path} returned a module with no parameters")
    return model


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], path: str) -> None:
    """Load weights into a freshly built model; a mismatch names the factory and tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(
        name for name in set(own) & set(weights) if own[name].shape != weights[name].shape
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append(
                "shape "
                + ", ".join(
                    f"{n} {tuple(own[n].shape)} vs {tuple(weights[n].shape)}" for n in wrong[:5]
                )
            )
        raise UserCodeError(
            f"model factory {path} builds parameters that do not match the checkpoint: "
            + "; ".join(parts)
        )
    model.load_state_dict(dict(weights))


def check_metrics(result: object, who: str) -> dict[str, float]:
    """A user function's metrics: a mapping of names to finite numbers, bounded in size."""
    if result is None:
        return {}
    if not isinstance(result, Mapping):
        raise UserCodeError(f"{who} returned {type(result).__name__}, not a dict of metrics")
    if len(result) > MAX_METRICS:
        raise UserCodeError(f"{who} returned {len(result)} metrics, at most {MAX_METRICS}")
    metrics: dict[str, float] = {}
    for name, value in result.items():
        if not isinstance(name, str) or not _METRIC_NAME.match(name):
            raise UserCodeError(f"{who} returned a metric named {name!r}: use letters, digits, _")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserCodeError(
                f"{who} returned metric {name!r} = {value!r}, not a number"
            ) from None
        if not math.isfinite(number):
            raise UserCodeError(f"{who} returned metric {name!r} = {number}: not finite")
        metrics[name] = number
    return metrics


def call_user(function: Callable[..., Any], who: str, *args: Any) -> Any:
    """Call a user function; anything it raises (``sys.exit`` included) becomes a
    :class:`UserCodeError`."""
    try:
        return function(*args)
    except UserCodeError:
        raise
    except (Exception, SystemExit) as exc:
        raise UserCodeError(f"{who} raised {type(exc).__name__}: {exc}") from exc


def _args(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
