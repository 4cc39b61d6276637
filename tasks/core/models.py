"""Model architectures a federation can train, built from the typed model config."""

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


def build_model(config: ModelConfig, seed: int) -> MnistCNN:
    """A freshly initialised model; the same seed gives the same initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MnistCNN(config.conv1, config.conv2, config.hidden)


def count_parameters(weights: Weights) -> int:
    return sum(t.numel() for t in weights.values())
