"""A federation whose sites train through an existing Flower ``NumPyClient``, end to end.

Scenario (NVFlare-style): trigger → fault → expected state.
- Four sites bring their own ``.npz`` files and ``site.yaml`` (``data.source: sites``). The
  federation names a user package's Flower ``client_fn`` as ``training.train`` and a
  factory of the same client as ``evaluation.evaluate``; the package (written as Flower's
  PyTorch quickstart writes one, with its own model, data loading and training loop) is on
  the import path of the CLI and of the site processes it spawns, and flwr is the real one.
- At site-d the client returns garbage (one array short): site-d is left out of every
  round with a reason naming the Flower client; the other three finish the run, which
  registers a model.
- The final checkpoint equals a FedAvg computed here by running the user's code by hand
  over the three good sites (each with its round seed, as the adapter seeds the client),
  weighted by the num_examples the client reports; the run's accuracy is the client's own
  ``evaluate`` on the coordinator's hold-out set.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader

from fedround.tasks.checkpoints import load_checkpoint
from fedround.tasks.core import keys
from fedround.tasks.core.config import load_federation_config
from fedround.tasks.core.models import build_model
from fedround.tasks.core.selection import derive_seed
from fedround.tasks.core.strategies import fedavg
from fedround.tasks.object_store import LocalObjectStore

from .helpers import run_user_federation, sites_yaml, write_array_federation

pytestmark = pytest.mark.slow

FEDERATION = "e2e-flower"
SITES = {"site-a": 60, "site-b": 40, "site-c": 50, "site-d": 30}
GOOD = ["site-a", "site-b", "site-c"]
CLIENT_FN = "fr_e2e_flower.client:client_fn"

USER_CLIENT = '''
"""A user's Flower app, as Flower's PyTorch quickstart writes one. fedround is not in it."""

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from flwr.client import NumPyClient
from flwr.common import Context
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def get_weights(net):
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net, parameters):
    params_dict = zip(net.state_dict().keys(), parameters)
    state_dict = OrderedDict({k: torch.tensor(v) for k, v in params_dict})
    net.load_state_dict(state_dict, strict=True)


def load_data(path):
    with np.load(path) as archive:
        return TensorDataset(
            torch.from_numpy(archive["features"]), torch.from_numpy(archive["labels"])
        )


def train(net, trainloader, epochs, lr):
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    total = 0.0
    for _ in range(epochs):
        total = 0.0
        for features, labels in trainloader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(features), labels)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(labels)
    return total / len(trainloader.dataset)


def test(net, testloader):
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for features, labels in testloader:
            outputs = net(features)
            loss += F.cross_entropy(outputs, labels, reduction="sum").item()
            correct += (outputs.argmax(1) == labels).sum().item()
    return loss / len(testloader.dataset), correct / len(testloader.dataset)


class FlowerClient(NumPyClient):
    def __init__(self, net, trainloader, valloader):
        self.net = net
        self.trainloader = trainloader
        self.valloader = valloader

    def get_parameters(self, config):
        return get_weights(self.net)

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        loss = train(self.net, self.trainloader, config["local_epochs"], config["lr"])
        return get_weights(self.net), len(self.trainloader.dataset), {"loss": loss}

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader)
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


class ShortClient(FlowerClient):
    """A broken client: it leaves the last array out of what it returns."""

    def fit(self, parameters, config):
        weights, n, metrics = super().fit(parameters, config)
        return weights[:-1], n, metrics


def client_fn(context: Context):
    data = load_data(context.node_config["data-path"])
    trainloader = DataLoader(data, batch_size=context.run_config["batch-size"], shuffle=True)
    valloader = DataLoader(data, batch_size=64)
    kind = ShortClient if context.node_config["site"] == "site-d" else FlowerClient
    return kind(Net(), trainloader, valloader).to_client()


def evaluation_client(data):
    """The same client on the data fedround hands it (the coordinator's hold-out set)."""
    dataset = TensorDataset(data.features, data.labels)
    return FlowerClient(Net(), DataLoader(dataset), DataLoader(dataset, batch_size=64))
'''

CONTRACT = {
    "name": "flower-arrays",
    "expectations": [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        },
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "n_features", "min_value": 8, "max_value": 8},
        },
    ],
}


FEDERATION_YAML = textwrap.dedent(
    f"""\
    federation: {FEDERATION}
    tenant: test
    seed: 5
    rounds: 2
    data: {{kind: arrays, source: sites}}
    model: {{factory: 'fr_e2e_flower.client:Net'}}
    training: {{train: '{CLIENT_FN}', local_epochs: 3, learning_rate: 0.3, batch_size: 16}}
    evaluation: {{holdout: holdout.npz, evaluate: 'fr_e2e_flower.client:evaluation_client'}}
    selection: {{min_sites: 3, deadline_s: 300}}
    contract: contract.json
    sites: {sites_yaml(SITES)}
    """
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sites with their own files and site.yaml, the user's Flower package, the config."""
    return write_array_federation(
        tmp_path_factory.mktemp("flower"),
        FEDERATION,
        SITES,
        package="fr_e2e_flower",
        modules={"client": USER_CLIENT},
        contract=CONTRACT,
        configs={"federation.yaml": FEDERATION_YAML},
    )


@pytest.fixture(scope="module")
def result(federation: Path) -> dict[str, Any]:
    """``fedround run`` as a user runs it."""
    done = run_user_federation(federation)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.result


def test_the_garbage_site_is_left_out_with_the_flower_client_named(
    result: dict[str, Any],
) -> None:
    left_out = result["sites"]["left_out_in_rounds"]
    assert sorted(left_out) == ["1", "2"]
    for reasons in left_out.values():
        assert sorted(reasons) == ["site-d"]
        assert (
            f"Flower client {CLIENT_FN}: fit returned 3 arrays; the model has 4 tensors"
            in reasons["site-d"]
        )


def test_three_flower_sites_finish_the_run_and_a_model_is_registered(
    result: dict[str, Any],
) -> None:
    assert result["rounds"] == 2
    assert result["sites"]["excluded"] == {}  # every contract passed: the fault is in code
    assert result["sites"]["participating"] == GOOD
    assert [h["sites_accepted"] for h in result["history"]] == [3.0, 3.0]
    assert result["model"]["version"] == "1"
    uri = result["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(f"{FEDERATION}-global", "candidate")
    assert version.tags["fedround.weights_sha256"] == result["checkpoint"]["weights_sha256"]
    assert version.tags["fedround.sites"] == ",".join(GOOD)


def test_the_model_is_fedavg_of_the_flower_clients_own_training(
    result: dict[str, Any], federation: Path
) -> None:
    # Prepare: the user's own code, run here by hand the way the adapter runs it
    sys.path.insert(0, str(federation / "user_pkg"))
    try:
        from fr_e2e_flower import client as user  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(federation / "user_pkg"))
    config = load_federation_config(federation / "fed" / "federation.yaml")
    weights = build_model(config.model, seed=config.seed).state_dict()
    for round_ in (1, 2):
        updates = []
        for site in GOOD:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(config.seed, "train", round_, site))
                net = user.Net()
                user.set_weights(net, [t.numpy() for t in weights.values()])
                data = user.load_data(str(federation / "sites" / site / "train.npz"))
                user.train(net, DataLoader(data, batch_size=16, shuffle=True), 3, 0.3)
            delta = {k: v.detach() - weights[k] for k, v in net.state_dict().items()}
            updates.append((delta, SITES[site]))
        weights = fedavg(weights, updates)
    holdout = user.load_data(str(federation / "fed" / "holdout.npz"))
    final_net = user.Net()
    final_net.load_state_dict(weights)
    loss, accuracy = user.test(final_net, DataLoader(holdout, batch_size=64))

    # Execute
    store = LocalObjectStore(federation / "state" / "objects")
    final = load_checkpoint(store, FEDERATION, result["run_id"], 2)  # verifies its digests

    # Assert
    assert final.manifest.sites == GOOD
    for name, tensor in final.weights.items():
        assert torch.allclose(tensor, weights[name], atol=1e-5), name
    assert result["final_metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["final_metrics"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert accuracy > 0.8  # a linearly separable rule, learnt through the Flower clients
    for round_ in (1, 2):
        assert not store.exists(keys.update_key(FEDERATION, result["run_id"], round_, "site-d"))
        for site in GOOD:
            assert store.exists(keys.update_key(FEDERATION, result["run_id"], round_, site))
