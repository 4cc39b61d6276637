"""Run a site's existing Flower ``NumPyClient`` as its fedround training and evaluation.

A federation names the client where it would name its own ``train`` (or ``evaluate``)::

    training:   {train: my_package.client:FlowerClient}    # a NumPyClient subclass
    training:   {train: my_package.client:client_fn}       # or a factory that returns one
    evaluation: {evaluate: my_package.client:client_fn}    # optional: its evaluate() scores

It may name a ``NumPyClient`` subclass, a ready instance, or a factory function returning
a ``NumPyClient`` (or the ``Client`` that ``NumPyClient.to_client()`` makes). fedround
builds the client for every round, as Flower's ``ClientApp`` does, passing by parameter
name whichever of these the constructor or factory declares:

- ``context``: a ``flwr.common.Context`` as Flower's ``client_fn(context)`` receives it;
  ``node_config`` holds ``site``, ``federation`` and ``data-path`` (the site's own data
  file, when fedround knows it) and ``run_config`` holds ``local-epochs``,
  ``learning-rate``, ``batch-size`` (fedround's defaults in evaluation), ``seed`` and
  ``server-round``;
- ``model``: fedround's ``torch.nn.Module`` with the round's global weights loaded; a
  client that trains this very object gets the strategy's hooks (FedProx's proximal term);
- ``data``: the site's :class:`~fedround.tasks.core.usercode.SiteDataset` (the only way in
  for the coordinator's central evaluation, where there is no site data file);
- ``settings``: the federation's ``TrainingConfig`` (``None`` in evaluation);
- ``round_context``: fedround's :class:`~fedround.tasks.core.usercode.RoundContext`.

A function counts as a client factory when its return annotation names ``NumPyClient`` or
``Client``, or when it cannot be called as fedround's own ``train(model, data, settings,
context)`` (``evaluate(model, data, context)``) and either takes one argument (Flower's
``client_fn``) or only arguments of that list; any other function is fedround's own.

Then, per round: ``parameters`` = the fedround model's ``state_dict()`` tensors as NumPy
arrays in ``state_dict`` order (the convention of Flower's PyTorch examples), and
``client.fit(parameters, config)`` with ``config`` = ``server_round``, ``local_epochs``,
``learning_rate`` (and ``lr``), ``batch_size``, ``seed``, ``site``. The returned arrays are
checked (count, shapes, numbers, finite) and loaded back into the fedround model; the
returned ``num_examples`` weighs the site's update; numeric metrics become fedround metrics
(string and bytes metrics are dropped). ``client.evaluate(parameters, config)`` gives
``{"loss": loss, **metrics}``. Whatever the client raises or returns wrong ends in one
:class:`UserCodeError` naming it: the site is left out of the round.

Strategy hooks act on fedround's model only. A client that trains a model of its own is
outside their reach: FedProx then runs as FedAvg at that site (a warning says so), unless
the client takes ``model`` and trains it.

flwr itself is imported only to build a ``context``: fedround never imports it otherwise.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedround.tasks.core.config import TrainingConfig
from fedround.tasks.core.usercode import (
    RoundContext,
    SiteDataset,
    UserCodeError,
    call_user,
    check_metrics,
    load_callable,
)

log = logging.getLogger(__name__)

# What a client's constructor or factory may ask for, by parameter name.
CLIENT_ARGUMENTS = ("context", "model", "data", "settings", "round_context")
_CLIENT_METHODS = ("get_parameters", "fit", "evaluate")
# How many positional arguments fedround's own function of each role takes (train(model,
# data, settings, context), evaluate(model, data, context)): a function that can take them
# is that fedround function, not a client factory.
_FEDROUND_ARITY = {"train function": 4, "evaluate function": 3}


@dataclass(frozen=True)
class FitOutcome:
    """What a Flower client's ``fit`` gave back, checked and loaded into the model."""

    metrics: dict[str, float]
    num_examples: int


def is_numpy_client(candidate: object) -> bool:
    """Whether ``candidate`` (a class or an instance) looks like a Flower ``NumPyClient``:
    duck-typed, so flwr need not be imported to tell."""
    return all(callable(getattr(candidate, name, None)) for name in _CLIENT_METHODS)


def _returns_client(function: Any) -> bool:
    try:
        annotation = inspect.signature(function).return_annotation
    except (TypeError, ValueError):
        return False
    if annotation is inspect.Signature.empty:
        return False
    if isinstance(annotation, type):
        return is_numpy_client(annotation)
    name = str(annotation).strip("'\"").rsplit(".", 1)[-1]
    return name in ("NumPyClient", "Client")


def _is_client_factory(function: Any, arity: int) -> bool:
    if _returns_client(function):
        return True
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(*range(arity))
        return False  # callable as fedround's own function of that role
    except TypeError:
        pass
    required = [
        p
        for p in signature.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty
    ]
    # Flower's client_fn(context) (client_fn(cid) before flwr 1.13), or fedround's names.
    return len(required) == 1 or all(p.name in CLIENT_ARGUMENTS for p in required)


def _attribute(path: str) -> object | None:
    module_name, _, attribute = path.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception:
        return None
    return target


class FlowerClient:
    """A Flower client named by a federation: built per round, called at the boundary."""

    def __init__(self, path: str, target: object) -> None:
        self.path = path
        self.target: Any = target
        self.who = f"Flower client {path}"

    # -- building ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the federation names a ready instance (used as it is, every round)."""
        return not inspect.isclass(self.target) and is_numpy_client(self.target)

    def wants(self, argument: str) -> bool:
        """Whether the constructor or factory takes ``argument`` (by name)."""
        if self.ready:
            return False
        try:
            return argument in inspect.signature(self.target).parameters
        except (TypeError, ValueError):
            return False

    def build(
        self,
        model: nn.Module,
        data: SiteDataset,
        settings: TrainingConfig | None,
        context: RoundContext,
    ) -> Any:
        """The client for this round: the instance itself, or a fresh one from the class
        or factory, given the arguments it asks for by name."""
        target: Any = self.target
        if self.ready:
            client: Any = target
        else:
            kwargs = self._arguments(model, data, settings, context)
            client = call_user(lambda: target(**kwargs), self.who)
        inner = getattr(client, "numpy_client", None)  # NumPyClient.to_client()'s wrapper
        if inner is not None and is_numpy_client(inner):
            client = inner
        flower_base = getattr(sys.modules.get("flwr.client"), "Client", None)
        if isinstance(flower_base, type) and isinstance(client, flower_base):
            raise UserCodeError(
                f"{self.who} gave a flwr Client ({type(client).__name__}), not a NumPyClient: "
                "fedround runs NumPyClients (get_parameters, fit and evaluate on lists of "
                "NumPy arrays)"
            )
        if inspect.isclass(client) or not is_numpy_client(client):
            hint = (
                ""
                if inspect.isclass(target)
                else "; a function that cannot be called as fedround's own train(model, data, "
                "settings, context) or evaluate(model, data, context) is taken for a client "
                "factory"
            )
            raise UserCodeError(
                f"{self.who} gave {type(client).__name__}, not a Flower NumPyClient (an object "
                f"with get_parameters, fit and evaluate on lists of NumPy arrays){hint}"
            )
        return client

    def _arguments(
        self,
        model: nn.Module,
        data: SiteDataset,
        settings: TrainingConfig | None,
        context: RoundContext,
    ) -> dict[str, Any]:
        try:
            parameters = inspect.signature(self.target).parameters
        except (TypeError, ValueError):
            return {}
        kwargs: dict[str, Any] = {}
        for name, parameter in parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if name not in CLIENT_ARGUMENTS or parameter.kind is parameter.POSITIONAL_ONLY:
                if parameter.default is inspect.Parameter.empty:
                    raise UserCodeError(
                        f"{self.who} needs argument {name!r}: fedround passes only "
                        f"{', '.join(CLIENT_ARGUMENTS)} (by name); wrap the client in a "
                        "factory function that takes those (Flower's client_fn takes "
                        "`context`: the site is context.node_config['site'])"
                    )
                continue
            if name == "context":
                kwargs[name] = flower_context(context, settings, self.who)
            elif name == "model":
                kwargs[name] = model
            elif name == "data":
                kwargs[name] = data
            elif name == "settings":
                kwargs[name] = settings
            else:
                kwargs[name] = context
        return kwargs

    # -- fit and evaluate -------------------------------------------------------------

    def fit(
        self,
        model: nn.Module,
        data: SiteDataset,
        settings: TrainingConfig,
        context: RoundContext,
        hooked: bool = False,
    ) -> FitOutcome:
        """One round of the client's own training, from ``model``'s weights; the returned
        parameters are loaded back into ``model``."""
        with seeded(context.seed):
            client = self.build(model, data, settings, context)
            if hooked and not self.wants("model"):
                log.warning(
                    "%s trains a model of its own: the strategy's client hooks (FedProx's "
                    "proximal term) do not reach it; take a `model` argument and train it "
                    "to have them apply",
                    self.who,
                )
            config = fit_config(settings, context)
            result = call_user(client.fit, f"{self.who}: fit", parameters_of(model), config)
        arrays, num_examples, metrics = self._triple(
            result, "fit", "(parameters, num_examples, metrics)"
        )
        outcome = FitOutcome(
            metrics=check_metrics(numeric(metrics), f"{self.who}: fit"),
            num_examples=self._count(num_examples, "fit", minimum=1),
        )
        load_parameters(model, arrays, f"{self.who}: fit")  # last: all or nothing
        return outcome

    def evaluate(
        self, model: nn.Module, data: SiteDataset, context: RoundContext
    ) -> dict[str, float]:
        """The client's ``evaluate`` of ``model``'s weights: ``loss`` and its metrics."""
        with seeded(context.seed):
            client = self.build(model, data, None, context)
            config = evaluate_config(context)
            result = call_user(
                client.evaluate, f"{self.who}: evaluate", parameters_of(model), config
            )
        loss, num_examples, metrics = self._triple(
            result, "evaluate", "(loss, num_examples, metrics)"
        )
        self._count(num_examples, "evaluate", minimum=0)
        who = f"{self.who}: evaluate"
        scores = check_metrics(numeric(metrics), who)
        return {**scores, **check_metrics({"loss": loss}, who)}

    def _triple(self, result: object, method: str, shape: str) -> tuple[Any, Any, Any]:
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            raise UserCodeError(f"{self.who}: {method} returned {_describe(result)}, not {shape}")
        return result[0], result[1], result[2]

    def _count(self, value: object, method: str, minimum: int) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or int(value) < minimum
        ):
            raise UserCodeError(
                f"{self.who}: {method} returned num_examples = {value!r}, not an integer "
                f">= {minimum}"
            )
        return int(value)


def flower_client(path: str, role: str) -> FlowerClient | None:
    """The Flower client ``path`` names, or ``None`` when it names an ordinary fedround
    function (``role``: how the federation's config calls it, for error messages)."""
    try:
        target: object = load_callable(path, role)
    except UserCodeError:
        candidate = _attribute(path)  # a ready client instance is not callable
        if candidate is not None and is_numpy_client(candidate):
            return FlowerClient(path, candidate)
        raise
    if inspect.isclass(target):
        return FlowerClient(path, target) if is_numpy_client(target) else None
    if is_numpy_client(target) or _is_client_factory(target, _FEDROUND_ARITY.get(role, 4)):
        return FlowerClient(path, target)
    return None


# -- conversions ------------------------------------------------------------------------


def parameters_of(model: nn.Module) -> list[np.ndarray]:
    """The model's ``state_dict`` tensors as NumPy arrays, in ``state_dict`` order (copies:
    the client cannot reach into the model through them)."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def load_parameters(model: nn.Module, arrays: object, who: str) -> None:
    """Load a client's arrays into ``model``, in ``state_dict`` order, after checking their
    count, shapes and values; nothing is loaded unless all of them pass."""
    own = model.state_dict()
    names = list(own)
    if not isinstance(arrays, (list, tuple)):
        raise UserCodeError(
            f"{who} returned parameters as {_describe(arrays)}, not a list of arrays"
        )
    if len(arrays) != len(names):
        raise UserCodeError(
            f"{who} returned {len(arrays)} arrays; the model has {len(names)} tensors "
            f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}): return every "
            "state_dict tensor, in state_dict order"
        )
    loaded: dict[str, torch.Tensor] = {}
    for index, (name, array) in enumerate(zip(names, arrays, strict=True)):
        try:
            values = np.asarray(array)
        except Exception as exc:
            raise UserCodeError(
                f"{who} returned parameter {index} ({name}) as {_describe(array)}: {exc}"
            ) from exc
        if values.dtype == object or not (
            np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_
        ):
            raise UserCodeError(
                f"{who} returned parameter {index} ({name}) of dtype {values.dtype}, not numbers"
            )
        if tuple(values.shape) != tuple(own[name].shape):
            raise UserCodeError(
                f"{who} returned parameter {index} ({name}) with shape {tuple(values.shape)}; "
                f"the model's is {tuple(own[name].shape)}"
            )
        if np.issubdtype(values.dtype, np.inexact) and not bool(np.isfinite(values).all()):
            raise UserCodeError(f"{who} returned non-finite values (NaN or inf) in {name}")
        loaded[name] = torch.from_numpy(np.array(values)).to(own[name].dtype)
    model.load_state_dict(loaded)


def numeric(metrics: object) -> object:
    """A Flower metrics dict with its string and bytes values (valid Flower scalars, not
    fedround metrics) left out; anything else goes on to :func:`check_metrics`."""
    if not isinstance(metrics, Mapping):
        return metrics
    return {k: v for k, v in metrics.items() if not isinstance(v, (str, bytes))}


def fit_config(settings: TrainingConfig, context: RoundContext) -> dict[str, Any]:
    """The ``config`` a client's ``fit`` gets: what Flower strategies' ``on_fit_config_fn``
    commonly send, from the federation's training settings."""
    return {
        "server_round": context.round,
        "local_epochs": settings.local_epochs,
        "learning_rate": settings.learning_rate,
        "lr": settings.learning_rate,
        "batch_size": settings.batch_size,
        "seed": context.seed,
        "site": context.site,
    }


def evaluate_config(context: RoundContext) -> dict[str, Any]:
    return {"server_round": context.round, "seed": context.seed, "site": context.site}


def flower_context(
    context: RoundContext, settings: TrainingConfig | None, who: str = "a Flower client"
) -> Any:
    """A ``flwr.common.Context`` for a ``client_fn(context)``, filled from fedround's."""
    try:
        from flwr.common import Context
    except ImportError as exc:
        raise UserCodeError(
            f"{who} asks for `context`, but flwr cannot be imported here ({exc}): install "
            "it at this site (see the README's Flower section)"
        ) from exc
    node_config: dict[str, Any] = {"site": context.site, "federation": context.federation}
    data_path = context.extra.get("data_path")
    if data_path:
        node_config["data-path"] = str(data_path)
    # Evaluation does not get the federation's training settings: fedround's defaults
    # stand in, so a client_fn that reads them still builds its client.
    training = settings if settings is not None else TrainingConfig()
    run_config: dict[str, Any] = {
        "server-round": context.round,
        "seed": context.seed,
        "local-epochs": training.local_epochs,
        "learning-rate": training.learning_rate,
        "batch-size": training.batch_size,
    }
    values: dict[str, Any] = {
        "run_id": _int_id(context.run_id),
        "node_id": _int_id(context.site),
        "node_config": node_config,
        "state": _record_dict(),
        "run_config": run_config,
    }
    accepted = inspect.signature(Context).parameters
    return Context(**{k: v for k, v in values.items() if k in accepted})


def _record_dict() -> Any:
    import flwr.common as common

    for name in ("RecordDict", "RecordSet"):  # RecordSet before flwr 1.20
        kind = getattr(common, name, None)
        if kind is not None:
            return kind()
    return None


def _int_id(text: str) -> int:
    """A stable positive integer for a string (Flower's ids are integers)."""
    return zlib.crc32(text.encode()) or 1


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's and NumPy's global generators for the client (its DataLoader shuffles,
    its initialisation), and restore them afterwards."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


def _describe(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__
