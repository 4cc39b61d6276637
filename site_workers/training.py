"""Local training at a site: plain torch, seeded, no I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedround.tasks.core.config import TrainingConfig
from fedround.tasks.core.serialization import Weights


@dataclass(frozen=True)
class LocalTrainingResult:
    weights: Weights
    num_examples: int
    loss: float
    accuracy: float
    seconds: float


def train_locally(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    config: TrainingConfig,
    seed: int,
) -> LocalTrainingResult:
    """SGD over the site's data for ``config.local_epochs`` epochs, shuffled by ``seed``.

    The loss and accuracy are over the last epoch's mini-batches (training metrics).
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.learning_rate, momentum=config.momentum
    )
    model.train()
    n = len(labels)
    total_loss = 0.0
    correct = 0
    for _ in range(config.local_epochs):
        total_loss, correct = 0.0, 0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            logits = model(features[batch])
            loss = F.cross_entropy(logits, labels[batch])
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(dim=1) == labels[batch]).sum())
    weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return LocalTrainingResult(
        weights=weights,
        num_examples=n,
        loss=total_loss / max(n, 1),
        accuracy=correct / max(n, 1),
        seconds=time.perf_counter() - started,
    )
