"""A user's Flower code, written the way Flower's PyTorch quickstart writes it: a model, a
training loop and a ``NumPyClient`` of its own, with no fedround in it. The unit tests
name its classes and factories as a federation's ``training.train`` /
``evaluation.evaluate``; the broken clients at the end misbehave on purpose."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.client import Client, NumPyClient
from flwr.common import (
    Code,
    Context,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    Status,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedround.api import SiteDataset


class Net(nn.Module):
    def __init__(self, in_features: int = 4, out_features: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 8)
        self.fc2 = nn.Linear(8, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def get_weights(net: nn.Module) -> list[np.ndarray]:
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net: nn.Module, parameters: list[np.ndarray]) -> None:
    params_dict = zip(net.state_dict().keys(), parameters, strict=True)
    state_dict = OrderedDict({k: torch.tensor(v) for k, v in params_dict})
    net.load_state_dict(state_dict, strict=True)


def train(net: nn.Module, trainloader: DataLoader[Any], epochs: int, lr: float) -> float:
    """The user's own loop: mini-batch SGD on cross-entropy."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running = 0.0
    for _ in range(epochs):
        running = 0.0
        for features, labels in trainloader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(features), labels)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(labels)
    return running / len(trainloader.dataset)  # type: ignore[arg-type]


def test(net: nn.Module, testloader: DataLoader[Any]) -> tuple[float, float]:
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for features, labels in testloader:
            outputs = net(features)
            loss += F.cross_entropy(outputs, labels, reduction="sum").item()
            correct += int((outputs.argmax(1) == labels).sum())
    n = len(testloader.dataset)  # type: ignore[arg-type]
    return loss / n, correct / n


def load_data(path: str) -> TensorDataset:
    with np.load(path) as archive:
        return TensorDataset(
            torch.from_numpy(archive["features"]).float(), torch.from_numpy(archive["labels"])
        )


def synthetic(n: int = 48, seed: int = 7) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 4, generator=generator)
    return TensorDataset(features, (features[:, 0] - features[:, 1] > 0).long())


class FlowerClient(NumPyClient):
    def __init__(
        self, net: nn.Module, trainloader: DataLoader[Any], valloader: DataLoader[Any]
    ) -> None:
        self.net = net
        self.trainloader = trainloader
        self.valloader = valloader

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return get_weights(self.net)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        set_weights(self.net, parameters)
        loss = train(self.net, self.trainloader, config["local_epochs"], config["lr"])
        return (
            get_weights(self.net),
            len(self.trainloader.dataset),  # type: ignore[arg-type]
            {"loss": loss, "round": config["server_round"], "device": "cpu"},
        )

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader)
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}  # type: ignore[arg-type]


def client_fn(context: Context) -> Client:
    """Flower's own ``client_fn``: the site's data from ``node_config``, the
    hyperparameters from ``run_config``."""
    data = load_data(str(context.node_config["data-path"]))
    batch_size = int(context.run_config["batch-size"])
    trainloader = DataLoader(data, batch_size=batch_size, shuffle=True)
    return FlowerClient(Net(), trainloader, DataLoader(data, batch_size=64)).to_client()


class SyntheticClient(FlowerClient):
    """A client that needs no arguments: it brings its own model and data."""

    def __init__(self) -> None:
        data = synthetic()
        super().__init__(
            Net(), DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=64)
        )


SYNTHETIC = SyntheticClient()  # a ready instance, named as `module:SYNTHETIC`


def client_on_fedround_data(model: nn.Module, data: SiteDataset) -> NumPyClient:
    """A factory that trains fedround's own model on the data fedround loaded: strategy
    hooks (FedProx) reach this client's loop."""
    dataset = TensorDataset(data.features, data.labels)
    return FlowerClient(
        model, DataLoader(dataset, batch_size=len(dataset)), DataLoader(dataset, batch_size=64)
    )


def own_model_on_fedround_data(data: SiteDataset) -> NumPyClient:
    """The same full-batch client, on a model of its own."""
    dataset = TensorDataset(data.features, data.labels)
    return FlowerClient(
        Net(), DataLoader(dataset, batch_size=len(dataset)), DataLoader(dataset, batch_size=64)
    )


# -- clients that return garbage --------------------------------------------------------


class DropsATensor(SyntheticClient):
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        weights, n, metrics = super().fit(parameters, config)
        return weights[:-1], n, metrics


class WrongShape(SyntheticClient):
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        weights, n, metrics = super().fit(parameters, config)
        return [weights[0].T, *weights[1:]], n, metrics


class NaNWeights(SyntheticClient):
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        weights, n, metrics = super().fit(parameters, config)
        weights[2][:] = np.nan
        return weights, n, metrics


class Raises(SyntheticClient):
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        raise OSError("dataset shard missing")


class NoExamples(SyntheticClient):
    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        weights, _, metrics = super().fit(parameters, config)
        return weights, -3, metrics


class TwoValues(SyntheticClient):
    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return get_weights(self.net), 48


class NaNMetric(SyntheticClient):
    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        return 0.5, 48, {"accuracy": float("nan")}


class RawClient(Client):
    """A low-level flwr ``Client`` (FitIns/FitRes), not a NumPyClient."""

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        raise NotImplementedError

    def fit(self, ins: FitIns) -> FitRes:
        return FitRes(Status(Code.OK, ""), ins.parameters, 1, {})

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        return EvaluateRes(Status(Code.OK, ""), 0.0, 1, {})


def legacy_client_fn(cid: str) -> NumPyClient:
    """Flower's client_fn before 1.13 took a client id."""
    return SyntheticClient()


def not_a_client(context: Context) -> dict[str, float]:
    return {"accuracy": 1.0}


class NeedsShards(FlowerClient):
    def __init__(self, shards: int) -> None:
        super().__init__(Net(), DataLoader(synthetic()), DataLoader(synthetic()))
