"""Local training at a site: ``train(model, data, settings, context) -> metrics``.

fedround hands over the global model (to train in place), the site's examples after the
federation's preprocessing (``data.features`` float32, ``data.labels`` class indices), the
config's ``training`` section (``settings``: epochs, batch size, learning rate, weight
decay) and where it runs (``context``: site, round, and a seed to use for all randomness).
Strategy hooks (FedProx's proximal term, for one) act on every gradient during
``backward()``, so this loop does not need to know the strategy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # fedround is only needed for the type names
    from fedround.api import RoundContext, SiteDataset, TrainingConfig

VALIDATION_SHARE = 0.1  # of the site's own training rows, for early stopping
PATIENCE = 2  # epochs without a better validation loss before stopping
MIN_VALIDATION_ROWS = 20


def train(
    model: nn.Module, data: SiteDataset, settings: TrainingConfig, context: RoundContext
) -> dict[str, float]:
    """Adam for up to ``settings.local_epochs`` epochs with early stopping: keep the weights
    of the epoch with the lowest loss on a validation slice of the site's own rows."""
    generator = torch.Generator().manual_seed(context.seed)
    n = len(data)
    order = torch.randperm(n, generator=generator)
    n_validation = int(n * VALIDATION_SHARE)
    if n_validation < MIN_VALIDATION_ROWS:
        n_validation = 0  # too few rows to hold some back: train on all, no early stopping
    validation, fit = order[:n_validation], order[n_validation:]
    features, labels = data.features, data.labels
    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    best_loss, best_state, best_epoch, stale = float("inf"), None, 0, 0
    epochs = fit_loss = 0.0
    for epoch in range(1, settings.local_epochs + 1):
        model.train()
        total = 0.0
        shuffled = fit[torch.randperm(len(fit), generator=generator)]
        for start in range(0, len(shuffled), settings.batch_size):
            batch = shuffled[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(features[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        fit_loss, epochs = total / max(len(fit), 1), float(epoch)
        if not n_validation:
            continue
        model.eval()
        with torch.no_grad():
            held = float(F.cross_entropy(model(features[validation]), labels[validation]))
        if held < best_loss:
            best_loss, best_epoch, stale = held, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    metrics = {"loss": fit_loss, "epochs": epochs}
    if n_validation:
        metrics |= {"validation_loss": best_loss, "best_epoch": float(best_epoch)}
    return metrics
