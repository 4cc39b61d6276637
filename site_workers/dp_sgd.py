"""Record-level DP-SGD at a site (``privacy.mode: record``), with Opacus.

fedround's supervised loop, made private by Opacus's ``PrivacyEngine.make_private``
(Abadi et al., CCS 2016): batches are Poisson-sampled at rate q = 1/k, where k =
⌈n / batch_size⌉ is the number of batches of an epoch, every example's gradient is clipped
to L2 norm ``clip_norm`` C, and Gaussian noise σ·C is added to each batch's sum. One local
epoch is k such steps, so a round at a site spends ``local_epochs``·k Poisson-sampled
Gaussian steps at rate q (:func:`fedround.tasks.core.privacy.record.dp_steps`), which
the coordinator's privacy ledger charges the site (from the example count its data
contract reported) and the tenant.

The noise and the batch sampling draw from generators seeded from the operating system's
CSPRNG each round (``privacy.noise_seed`` fixes them, for tests only): the coordinator,
which knows the round's seed, cannot subtract the noise. Opacus's ``secure_mode`` needs
torchcsprng, which has no build for this torch: the generators are torch's own.

Opacus computes per-example gradients for the layers it knows (linear, convolution,
normalisation other than batch norm, embedding, recurrent ...); a model with a layer it
cannot handle, BatchNorm first among them (it mixes examples of a batch), is refused with
Opacus's reason and the fix.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedround.tasks.core.config import PrivacyConfig, TrainingConfig
from fedround.tasks.core.usercode import SiteDataset, UserCodeError


def check_private_model(model: nn.Module) -> None:
    """Raise :class:`UserCodeError` if Opacus cannot compute the model's per-example
    gradients, with its reasons and what to do."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        reasons = "; ".join(str(p).split(". ")[0] for p in problems[:3])
        raise UserCodeError(
            f"privacy.mode: record cannot train this model: {reasons}. Replace those layers "
            "(BatchNorm by GroupNorm or LayerNorm, e.g. with opacus.validators."
            "ModuleValidator.fix) in the model factory"
        )


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def dp_sgd_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SiteDataset,
    config: TrainingConfig,
    privacy: PrivacyConfig,
    seed: int,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    classify: bool,
) -> dict[str, float]:
    """Train ``model`` in place for ``config.local_epochs`` epochs of DP-SGD, with
    ``optimizer`` (over its parameters) made private; the loss and accuracy returned are
    over the last epoch's (Poisson-sampled) batches."""
    from opacus import PrivacyEngine

    assert privacy.noise_multiplier is not None and privacy.clip_norm is not None
    model.train()  # Opacus checks (and needs) training mode
    check_private_model(model)
    noise_seed = None
    if privacy.noise_seed is not None:
        noise_seed = (privacy.noise_seed * 1_000_003 + seed) % 2**63
    loader = DataLoader(
        TensorDataset(data.features, data.labels),
        batch_size=config.batch_size,
        generator=_generator(None if noise_seed is None else noise_seed + 1),
    )
    with warnings.catch_warnings():
        # "Secure RNG turned off": said above, and the reason.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant="prv")  # fedround's ledger accounts, not this one
        private, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.clip_norm,
            poisson_sampling=True,
            noise_generator=_generator(noise_seed),
        )
    private.train()
    total_loss, correct, seen = 0.0, 0, 0
    with warnings.catch_warnings():
        # Opacus's hooks on a first layer whose input needs no gradient: expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            for _ in range(config.local_epochs):
                total_loss, correct, seen = 0.0, 0, 0
                for features, labels in dp_loader:
                    dp_optimizer.zero_grad(set_to_none=True)
                    outputs = private(features)
                    if len(labels) == 0:  # Poisson sampling drew no example: noise only
                        (outputs.sum() * 0.0).backward()
                        dp_optimizer.step()
                        continue
                    batch_loss = loss(outputs, labels)
                    batch_loss.backward()
                    dp_optimizer.step()
                    total_loss += batch_loss.item() * len(labels)
                    seen += len(labels)
                    if classify:
                        correct += int((outputs.argmax(dim=1) == labels).sum())
        finally:
            private._close()  # removes Opacus's hooks from ``model``
    metrics = {"train_loss": total_loss / max(seen, 1)}
    if classify:
        metrics["train_accuracy"] = correct / max(seen, 1)
    return metrics
