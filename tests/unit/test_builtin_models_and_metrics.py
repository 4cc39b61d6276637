"""Built-in model factories and metrics: shapes, parameter counts, and metric values checked
against hand computation and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn

from fedround.tasks.core.config import ModelConfig
from fedround.tasks.core.evaluation import (
    builtin_metrics,
    classification_metrics,
    predict,
    regression_metrics,
)
from fedround.tasks.core.models import build_model, logistic_regression, mlp, mnist_cnn
from fedround.tasks.core.usercode import SiteDataset


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# models --------------------------------------------------------------------------------------


def test_mlp_has_the_layers_and_shapes_asked_for() -> None:
    model = mlp(5, 3, hidden=[8, 4])
    assert model(torch.zeros(7, 5)).shape == (7, 3)
    assert n_parameters(model) == (5 * 8 + 8) + (8 * 4 + 4) + (4 * 3 + 3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 8), (8, 4), (4, 3)]


def test_mlp_takes_one_hidden_width_and_dropout() -> None:
    model = mlp(2, 1, hidden=6, dropout=0.5)
    assert [type(m).__name__ for m in model.children()] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert n_parameters(model) == (2 * 6 + 6) + (6 + 1)


def test_logistic_regression_is_one_linear_layer() -> None:
    model = logistic_regression(8, 2)
    assert isinstance(model, nn.Linear)
    assert model(torch.zeros(4, 8)).shape == (4, 2)
    assert n_parameters(model) == 18


def test_mnist_cnn_has_the_demo_parameter_count_and_takes_raw_pixels() -> None:
    model = mnist_cnn()
    assert n_parameters(model) == 46_730
    assert model(torch.full((3, 784), 255.0)).shape == (3, 10)


def test_build_model_uses_the_config_defaults_and_the_seed() -> None:
    config = ModelConfig.model_validate({"factory": "mlp", "in_features": 4, "out_features": 2})
    assert config.kwargs == {
        "in_features": 4,
        "out_features": 2,
        "hidden": [64, 32],
        "dropout": 0.0,
    }
    first, second = build_model(config, 3), build_model(config, 3)
    assert n_parameters(first) == (4 * 64 + 64) + (64 * 32 + 32) + (32 * 2 + 2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


# classification ------------------------------------------------------------------------------

# labels 0 1 1 0; predicted 0 1 0 0; scores (logit1 − logit0) −2, 1, −2.5, −3
LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.5], [3.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_classification_metrics_match_hand_computation() -> None:
    # Execute
    metrics = classification_metrics(LOGITS, LABELS)

    # Assert
    def nll(row: list[float], label: int) -> float:
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    expected_loss = sum(nll(r, int(y)) for r, y in zip(LOGITS.tolist(), LABELS, strict=True)) / 4
    assert set(metrics) == {"loss", "accuracy", "f1", "auc"}
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["accuracy"] == 0.75
    # class 0: tp 2, fp 1, fn 0 → 4/5; class 1: tp 1, fp 0, fn 1 → 2/3
    assert metrics["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # positives score 1 and −2.5, negatives −2 and −3: 3 of 4 pairs ordered right
    assert metrics["auc"] == 0.75


def test_auc_counts_ties_as_half() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert classification_metrics(logits, torch.tensor([0, 1, 1]))["auc"] == 0.75


def test_auc_only_for_two_classes_with_both_present() -> None:
    assert "auc" not in classification_metrics(LOGITS, torch.tensor([1, 1, 1, 1]))
    three = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    metrics = classification_metrics(three, torch.tensor([0, 1, 2]))
    assert "auc" not in metrics
    assert (metrics["accuracy"], metrics["f1"]) == (1.0, 1.0)


def test_an_empty_set_has_no_metrics() -> None:
    assert classification_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == {}
    assert regression_metrics(torch.zeros(0), torch.zeros(0)) == {}


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 200),
    levels=st.sampled_from([3, 10, 1000]),
)
def test_auc_and_f1_agree_with_scikit_learn(seed: int, n: int, levels: int) -> None:
    # Prepare: scores on a coarse grid (many ties) or a fine one; both classes present
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[0], labels[1] = 0, 1
    scores = rng.integers(0, levels, n).astype(np.float32) / levels
    logits = torch.stack([torch.zeros(n), torch.from_numpy(scores)], dim=1)

    # Execute
    metrics = classification_metrics(logits, torch.from_numpy(labels))

    # Assert
    predicted = (scores > 0).astype(int)  # argmax; a tie (score 0) picks class 0
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=1e-12)


# regression ----------------------------------------------------------------------------------


def test_regression_metrics_are_exact_on_a_small_example() -> None:
    # errors 0, −1, 1, −2 → mse 6/4, mae 4/4; targets mean 3, variance 14/4 → r2 = 1 − 1.5/3.5
    predictions = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    targets = torch.tensor([1.0, 3.0, 2.0, 6.0])

    metrics = regression_metrics(predictions, targets)

    assert metrics == {
        "loss": 1.5,
        "mse": 1.5,
        "mae": 1.0,
        "rmse": pytest.approx(math.sqrt(1.5)),
        "r2": pytest.approx(4 / 7),
    }


def test_constant_targets_have_r2_zero_not_a_division_by_zero() -> None:
    assert regression_metrics(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]))["r2"] == 0.0


# through a model -----------------------------------------------------------------------------


def test_builtin_metrics_follow_the_dataset_task() -> None:
    # Prepare: y = 2x exactly, a linear model with weight 2
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.zero_()
    x = torch.arange(600, dtype=torch.float32)[:, None]  # more than one prediction batch
    data = SiteDataset(x, 2 * x[:, 0], task="regression")

    metrics = builtin_metrics(model, data)

    assert metrics["mse"] == 0.0 and metrics["r2"] == 1.0


def test_predict_in_batches_gives_the_whole_sets_metrics() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    outputs = predict(model, LOGITS, batch_size=3)
    result = classification_metrics(outputs, LABELS)
    expected = classification_metrics(LOGITS, LABELS)
    assert (result["loss"], result["accuracy"], len(outputs)) == (
        pytest.approx(expected["loss"]),
        0.75,
        4,
    )
    assert result["auc"] == 0.75
