"""Built-in model factories: the MNIST demo's CNN, and an MLP and logistic regression for
tables. A federation names them (``factory: mlp``) exactly as it names a user's own
factory (``factory: my_package.models:build``); see :mod:`fedround.tasks.core.usercode`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .serialization import Weights

# MNIST pixel statistics, applied inside the model so that it takes raw 0–255 pixels:
# the data contract checks raw pixels, and the registered model serves raw pixels.
MNIST_MEAN = 0.1307 * 255.0
MNIST_STD = 0.3081 * 255.0


class MnistCNN(nn.Module):
    """conv5(c1) → pool → conv5(c2) → pool → fc(hidden) → fc(10), on 28×28 inputs.

    With (16, 32, 64): 46,730 parameters, ~1.2 MFLOP-MACs per image forward.
    """

    def __init__(self, conv1: int = 16, conv2: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1, kernel_size=5)
        self.conv2 = nn.Conv2d(conv1, conv2, kernel_size=5)
        self.fc1 = nn.Linear(conv2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.reshape(-1, 1, 28, 28) - MNIST_MEAN) / MNIST_STD
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


def mnist_cnn(conv1: int = 16, conv2: int = 32, hidden: int = 64) -> nn.Module:
    """The demo's CNN on raw 0–255 pixels (784 per image), ten classes."""
    return MnistCNN(conv1, conv2, hidden)


def mlp(
    in_features: int, out_features: int, hidden: list[int] | int = 64, dropout: float = 0.0
) -> nn.Module:
    """A multilayer perceptron with ReLU: ``in_features`` → hidden layers → ``out_features``."""
    sizes = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = []
    width = in_features
    for size in sizes:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def logistic_regression(in_features: int, out_features: int) -> nn.Module:
    """One linear layer: logits for classification (softmax / logistic regression), or the
    prediction for regression (linear regression)."""
    return nn.Linear(in_features, out_features)


def build_model(config: ModelConfig, seed: int) -> nn.Module:
    """A freshly initialised model from its factory; the same seed gives the same weights.

    Imports the factory named by the config (a built-in or the user's): see
    :func:`fedround.tasks.core.usercode.build_user_model` for the checks on what it returns.
    """
    from .usercode import build_user_model

    return build_user_model(config, seed)


def count_parameters(weights: Weights) -> int:
    return sum(t.numel() for t in weights.values())
