"""fedround's public API for the code a federation brings: ``from fedround.api import ...``.

A federation is user code named in its YAML by import path (``package.module:function``),
installed as an ordinary Python package at the coordinator and at every site:

``model.factory`` — ``factory(**kwargs) -> torch.nn.Module``. The other keys of the YAML's
``model`` section are its keyword arguments; for tables, ``in_features`` and
``out_features`` are added after the federated set-up step when the factory accepts them.
Built-ins: ``mnist_cnn``, ``mlp``, ``logistic_regression``.

``training.train`` (optional) — the site's own local training::

    def train(model: nn.Module, data: SiteDataset, settings: TrainingConfig,
              context: RoundContext) -> Mapping[str, float]:
        ...  # train `model` in place on `data`; return training metrics

When absent, fedround's supervised loop runs (``settings``: epochs, batch size, learning
rate, optimizer, loss). Strategy hooks (e.g. FedProx's proximal term) act on every
parameter gradient during backward, so they apply to your loop without your code knowing.

``evaluation.evaluate`` (optional) — ``evaluate(model, data, context) -> {name: value}``;
declare the direction of metrics fedround does not know in ``evaluation.directions``.

``data.loader`` (optional) — ``loader(path: Path) -> pandas.DataFrame`` (tables) or
``-> (features, labels)`` arrays, for a file format fedround does not read itself
(it reads Parquet, CSV and ``.npz``).

User code is a boundary: whatever a function raises or returns that is not what the
signature says, the site is left out of the round with a message naming the function.
"""

from fedround.tasks.core.config import TrainingConfig
from fedround.tasks.core.hooks import ClientHook, ProximalTerm
from fedround.tasks.core.models import logistic_regression, mlp, mnist_cnn
from fedround.tasks.core.usercode import (
    EvaluateFunction,
    RoundContext,
    SiteDataset,
    TrainFunction,
    UserCodeError,
)

__all__ = [
    "ClientHook",
    "EvaluateFunction",
    "ProximalTerm",
    "RoundContext",
    "SiteDataset",
    "TrainFunction",
    "TrainingConfig",
    "UserCodeError",
    "logistic_regression",
    "mlp",
    "mnist_cnn",
]
