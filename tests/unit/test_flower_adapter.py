"""A site's Flower ``NumPyClient`` as its fedround training and evaluation
(``site_workers/flower.py``), with the real flwr package and a client written as Flower's
quickstart writes one (``flower_user_code.py``): the calling conventions, exact results,
strategy hooks, and every kind of garbage ending in a UserCodeError naming the client."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedround.site_workers.data import save_site_data
from fedround.site_workers.flower import fit_config, flower_client, parameters_of
from fedround.site_workers.site_round import evaluate_model
from fedround.site_workers.training import train_locally
from fedround.tasks.core.config import EvaluationConfig, StrategyConfig, TrainingConfig
from fedround.tasks.core.hooks import hooks_for, hooks_installed
from fedround.tasks.core.usercode import RoundContext, SiteDataset, UserCodeError

from . import flower_user_code as user
from . import user_code

PKG = user.__name__
SEED = 11


def context(data_path: Path | None = None, round_: int = 1) -> RoundContext:
    extra = {"data_path": str(data_path)} if data_path else {}
    return RoundContext("fed", "run-1", "site-a", round_, seed=SEED, extra=extra)


def dataset(n: int = 40, seed: int = 3) -> SiteDataset:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 4, generator=generator)
    labels = (features[:, 0] - features[:, 1] > 0).long()
    return SiteDataset(features, labels, num_classes=2)


def global_model() -> nn.Module:
    torch.manual_seed(0)
    return user.Net()


def training(train: str, **settings: object) -> TrainingConfig:
    return TrainingConfig.model_validate({"train": f"{PKG}:{train}", **settings})


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flowers_client_fn_trains_on_its_own_data_exactly_as_flower_would(
    tmp_path: Path,
) -> None:
    # Prepare: the site's file, which the client loads itself through node_config
    path = tmp_path / "train.npz"
    site = dataset(n=60, seed=5)
    save_site_data(path, site.features.numpy(), site.labels.numpy())
    model = global_model()
    start = copy.deepcopy(model.state_dict())
    config = training("client_fn", local_epochs=2, learning_rate=0.1, batch_size=16)

    # Expected: the user's own code, run by hand under the round's seed
    torch.manual_seed(SEED)
    net = user.Net()
    user.set_weights(net, [t.numpy() for t in start.values()])
    loader = DataLoader(user.load_data(str(path)), batch_size=16, shuffle=True)
    loss = user.train(net, loader, epochs=2, lr=0.1)

    # Execute: fedround's data is a different set: the client's own is what counts
    result = train_locally(model, dataset(n=10), config, context(path))

    # Assert
    assert same(result.weights, net.state_dict())
    assert not same(result.weights, start)
    assert result.num_examples == 60  # the client's num_examples weighs the update
    # numbers become metrics (train_ prefixed); the string metric is dropped
    assert result.metrics == {"train_loss": pytest.approx(loss), "train_round": 1.0}


def test_a_client_class_and_a_ready_instance_run_as_they_are() -> None:
    for name in ("SyntheticClient", "SYNTHETIC"):
        model = global_model()
        start = copy.deepcopy(model.state_dict())

        result = train_locally(model, dataset(), training(name), context())

        assert result.num_examples == 48, name
        assert set(result.metrics) == {"train_loss", "train_round"}, name
        assert not same(result.weights, start), name
        assert same(result.weights, model.state_dict()), name  # loaded back into the model


def test_the_client_gets_the_state_dict_in_order_and_the_round_settings() -> None:
    model = global_model()
    settings = TrainingConfig(local_epochs=3, learning_rate=0.2, batch_size=8)

    arrays = parameters_of(model)
    config = fit_config(settings, context(round_=4))

    assert [a.shape for a in arrays] == [(8, 4), (8,), (2, 8), (2,)]
    for array, tensor in zip(arrays, model.state_dict().values(), strict=True):
        assert np.array_equal(array, tensor.numpy())
    arrays[0][:] = 7.0  # copies: the client cannot reach into the model
    assert not bool((model.state_dict()["fc1.weight"] == 7.0).any())
    assert config == {
        "server_round": 4,
        "local_epochs": 3,
        "learning_rate": 0.2,
        "lr": 0.2,
        "batch_size": 8,
        "seed": SEED,
        "site": "site-a",
    }


def test_fedprox_reaches_a_client_that_trains_fedrounds_model() -> None:
    # Prepare: full-batch clients (deterministic), FedProx with a large mu
    data = dataset()
    config = training("client_on_fedround_data", local_epochs=5, learning_rate=0.5)
    model = global_model()
    hooks = hooks_for(StrategyConfig(name="fedprox", mu=2.0), model.state_dict())
    expected = copy.deepcopy(model)
    with hooks_installed(expected, hooks):
        user.train(expected, DataLoader(TensorDataset(data.features, data.labels), 40), 5, 0.5)

    # Execute
    with_hooks = train_locally(model, data, config, context(), hooks)
    without = train_locally(global_model(), data, config, context())

    # Assert: the proximal term acted inside the client's own loop
    assert same(with_hooks.weights, expected.state_dict())
    assert not same(with_hooks.weights, without.weights)


def test_fedprox_cannot_reach_a_client_with_a_model_of_its_own_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = dataset()
    config = training("own_model_on_fedround_data", local_epochs=5, learning_rate=0.5)
    hooks = hooks_for(StrategyConfig(name="fedprox", mu=2.0), global_model().state_dict())

    with caplog.at_level(logging.WARNING, logger="fedround.site_workers.flower"):
        with_hooks = train_locally(global_model(), data, config, context(), hooks)
    without = train_locally(global_model(), data, config, context())

    assert same(with_hooks.weights, without.weights)  # FedProx ran as FedAvg here
    assert f"Flower client {PKG}:own_model_on_fedround_data trains a model of its own" in (
        caplog.text
    )


@pytest.mark.parametrize(
    ("client", "message"),
    [
        (
            "DropsATensor",
            r"fit returned 3 arrays; the model has 4 tensors \(fc1.weight, fc1.bias, "
            r"fc2.weight, fc2.bias\): return every state_dict tensor, in state_dict order",
        ),
        (
            "WrongShape",
            r"fit returned parameter 0 \(fc1.weight\) with shape \(4, 8\); the model's is "
            r"\(8, 4\)",
        ),
        ("NaNWeights", r"fit returned non-finite values \(NaN or inf\) in fc2.weight"),
        ("Raises", r"fit raised OSError: dataset shard missing"),
        ("NoExamples", r"fit returned num_examples = -3, not an integer >= 1"),
        ("TwoValues", r"fit returned a tuple of 2, not \(parameters, num_examples, metrics\)"),
        ("RawClient", r"gave a flwr Client \(RawClient\), not a NumPyClient"),
        ("legacy_client_fn", r"needs argument 'cid': fedround passes only context, model"),
        ("NeedsShards", r"needs argument 'shards'"),
        ("not_a_client", r"gave dict, not a Flower NumPyClient .*taken for a client factory"),
    ],
)
def test_garbage_from_a_client_leaves_the_model_untouched_and_names_the_client(
    client: str, message: str
) -> None:
    model = global_model()
    start = copy.deepcopy(model.state_dict())

    with pytest.raises(UserCodeError, match=rf"^Flower client {PKG}:{client}\b.*{message}"):
        train_locally(model, dataset(), training(client), context())

    assert same(model.state_dict(), start)


def test_fedrounds_own_functions_are_not_taken_for_flower_clients() -> None:
    own = user_code.__name__
    assert flower_client(f"{own}:train_sgd", "train function") is None
    assert flower_client(f"{own}:train_raises", "train function") is None
    assert flower_client(f"{PKG}:client_fn", "train function") is not None
    assert flower_client(f"{PKG}:SyntheticClient", "evaluate function") is not None
    with pytest.raises(UserCodeError, match=r"train function .*:absent: module .* has no"):
        flower_client(f"{PKG}:absent", "train function")


def test_a_clients_evaluate_serves_as_the_federations_evaluate(tmp_path: Path) -> None:
    # Prepare
    data = dataset(n=30, seed=9)
    path = tmp_path / "test.npz"
    save_site_data(path, data.features.numpy(), data.labels.numpy())
    model = global_model()
    expected_loss, expected_accuracy = user.test(
        model, DataLoader(TensorDataset(data.features, data.labels), batch_size=64)
    )

    # Execute: a factory on fedround's data, and Flower's client_fn on the site's file
    on_data = evaluate_model(
        model, data, EvaluationConfig(evaluate=f"{PKG}:own_model_on_fedround_data"), "a", "fed"
    )
    on_file = evaluate_model(
        model, dataset(n=5), EvaluationConfig(evaluate=f"{PKG}:client_fn"), "a", "fed", path
    )

    # Assert
    for metrics in (on_data, on_file):
        assert metrics == {
            "loss": pytest.approx(expected_loss),
            "accuracy": pytest.approx(expected_accuracy),
        }


def test_non_finite_evaluation_metrics_are_refused_naming_the_client() -> None:
    with pytest.raises(
        UserCodeError,
        match=rf"Flower client {PKG}:NaNMetric: evaluate returned metric 'accuracy' = nan",
    ):
        evaluate_model(
            global_model(), dataset(), EvaluationConfig(evaluate=f"{PKG}:NaNMetric"), "a", "f"
        )


def test_fedround_does_not_import_flwr_unless_a_client_needs_it() -> None:
    script = (
        "import sys, torch\n"
        "from fedround.site_workers.training import train_locally\n"
        "from fedround.tasks.core.config import TrainingConfig\n"
        "from fedround.tasks.core.usercode import RoundContext, SiteDataset\n"
        "data = SiteDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))\n"
        "ctx = RoundContext('f', 'r', 's', 1, seed=0)\n"
        f"train = TrainingConfig(train='{user_code.__name__}:train_sgd')\n"
        "for config in (TrainingConfig(), train):\n"
        "    train_locally(torch.nn.Linear(4, 2), data, config, ctx)\n"
        "assert 'flwr' not in sys.modules, 'flwr was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
