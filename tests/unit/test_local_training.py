"""Local training at a site (``site_workers/training.py``): the user's ``train`` behind the
boundary (raises, NaN, hangs → UserCodeError naming it), the built-in loop's determinism,
and FedProx acting through the hook on a loop that knows nothing of it."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from torch import nn

from fedround.site_workers.training import train_locally
from fedround.tasks.core.config import StrategyConfig, TrainingConfig
from fedround.tasks.core.hooks import hooks_for
from fedround.tasks.core.usercode import RoundContext, SiteDataset, UserCodeError

from . import user_code

PKG = user_code.__name__
CONTEXT = RoundContext(federation="fed", run_id="run-1", site="site-c", round=1, seed=5)


def dataset(n: int = 64) -> SiteDataset:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, 4, generator=generator)
    labels = (features[:, 0] + features[:, 1] > 0).long()
    return SiteDataset(features, labels, num_classes=2)


def model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def user_train(name: str, **settings: object) -> TrainingConfig:
    return TrainingConfig.model_validate({"train": f"{PKG}:{name}", **settings})


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5)


def test_a_user_train_that_raises_is_named_with_its_error() -> None:
    with pytest.raises(UserCodeError) as info:
        train_locally(model(), dataset(), user_train("train_raises"), CONTEXT)
    assert str(info.value) == (
        f"train function {PKG}:train_raises raised RuntimeError: disk full at site-c"
    )


def test_nan_metrics_are_refused() -> None:
    with pytest.raises(
        UserCodeError,
        match=rf"train function {PKG}:train_nan_metrics returned metric 'loss' = nan: not finite",
    ):
        train_locally(model(), dataset(), user_train("train_nan_metrics"), CONTEXT)


def test_metrics_that_are_not_a_mapping_are_refused() -> None:
    with pytest.raises(UserCodeError, match=r"train_returns_list returned list, not a dict"):
        train_locally(model(), dataset(), user_train("train_returns_list"), CONTEXT)


def test_nan_left_in_the_weights_is_refused() -> None:
    with pytest.raises(
        UserCodeError,
        match=rf"train function {PKG}:train_nan_weights left non-finite weights in \['0.weight'\]",
    ):
        train_locally(model(), dataset(), user_train("train_nan_weights"), CONTEXT)


def test_a_train_function_that_cannot_be_imported_is_named() -> None:
    with pytest.raises(UserCodeError, match=rf"train function {PKG}:absent: module .* has no"):
        train_locally(model(), dataset(), user_train("absent"), CONTEXT)


def test_a_hanging_train_function_is_stopped_at_timeout() -> None:
    # Prepare
    net, data, config = model(), dataset(), user_train("train_hangs", timeout_s=1)
    started = time.monotonic()

    # Execute
    with pytest.raises(UserCodeError) as info:
        train_locally(net, data, config, CONTEXT)

    # Assert: stopped after about one second; no timer left running
    elapsed = time.monotonic() - started
    assert str(info.value) == (
        f"train function {PKG}:train_hangs did not finish within training.timeout_s = 1s"
    )
    assert 0.9 <= elapsed < 2.5
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_timeout_that_is_not_reached_leaves_no_timer_or_handler_behind() -> None:
    # Prepare
    before = signal.getsignal(signal.SIGALRM)

    # Execute
    result = train_locally(model(), dataset(), user_train("train_sgd", timeout_s=60), CONTEXT)

    # Assert
    assert result.num_examples == 64
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_user_metrics_are_reported_with_the_train_prefix() -> None:
    result = train_locally(model(), dataset(), user_train("train_sgd", local_epochs=2), CONTEXT)
    assert set(result.metrics) == {"train_loss", "train_site_steps"}
    assert result.metrics["train_site_steps"] == 2.0
    assert result.loss == result.metrics["train_loss"]


def test_the_builtin_loop_is_deterministic_for_a_seed() -> None:
    # Prepare
    config = TrainingConfig(local_epochs=2, batch_size=8, learning_rate=0.1)

    # Execute
    first = train_locally(model(), dataset(), config, CONTEXT)
    second = train_locally(model(), dataset(), config, CONTEXT)
    other_seed = train_locally(
        model(), dataset(), config, RoundContext("fed", "run-1", "site-c", 1, seed=6)
    )

    # Assert
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert first.metrics == second.metrics
    assert not torch.equal(first.weights["0.weight"], other_seed.weights["0.weight"])
    assert set(first.metrics) == {"train_loss", "train_accuracy"}
    assert first.num_examples == 64


def test_the_builtin_loop_fits_a_regression() -> None:
    # y = 3·x0 − x1 exactly: 200 epochs of full-batch SGD reach a small error
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(32, 2, generator=generator)
    data = SiteDataset(features, 3 * features[:, 0] - features[:, 1], task="regression")
    config = TrainingConfig(local_epochs=100, batch_size=32, learning_rate=0.1)
    result = train_locally(nn.Linear(2, 1), data, config, CONTEXT)
    assert result.weights["weight"][0].tolist() == pytest.approx([3.0, -1.0], abs=1e-2)
    assert result.metrics["train_loss"] < 1e-3
    assert "train_accuracy" not in result.metrics


@pytest.mark.parametrize("train", [None, f"{PKG}:train_sgd"])
def test_fedprox_pulls_the_trained_weights_toward_the_global_model(train: str | None) -> None:
    # Prepare: the global model is where local training starts
    config = TrainingConfig(local_epochs=20, batch_size=64, learning_rate=0.5, train=train)
    global_weights = {k: v.clone() for k, v in model().state_dict().items()}
    fedprox = StrategyConfig(name="fedprox", mu=1.0)

    # Execute
    plain = train_locally(model(), dataset(), config, CONTEXT)
    prox = train_locally(model(), dataset(), config, CONTEXT, hooks_for(fedprox, global_weights))

    # Assert
    assert not torch.equal(plain.weights["0.weight"], prox.weights["0.weight"])
    assert distance(prox.weights, global_weights) < 0.9 * distance(plain.weights, global_weights)


def test_hooks_are_removed_when_the_user_train_fails() -> None:
    # Prepare
    net = model()
    hooks = hooks_for(StrategyConfig(name="fedprox", mu=100.0), net.state_dict())
    with pytest.raises(UserCodeError):
        train_locally(net, dataset(), user_train("train_raises"), CONTEXT, hooks)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(1.0)  # far from the anchor: a leftover hook would show

    # Execute
    net.zero_grad()
    net(torch.ones(1, 4)).sum().backward()
    reference = model()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(1.0)
    reference(torch.ones(1, 4)).sum().backward()

    # Assert
    last = net[2]
    assert isinstance(last, nn.Linear) and last.bias.grad is not None
    assert last.bias.grad.tolist() == [1.0, 1.0]
    assert all(
        p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)
        for p, q in zip(net.parameters(), reference.parameters(), strict=True)
    )
