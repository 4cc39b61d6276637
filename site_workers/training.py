"""Local training at a site: fedround's supervised loop, or the federation's own ``train``,
with the strategy's client hooks installed either way. Plain torch, seeded, no I/O."""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedround.tasks.core.config import PrivacyConfig, TrainingConfig
from fedround.tasks.core.hooks import ClientHook, hooks_installed
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.usercode import (
    RoundContext,
    SiteDataset,
    UserCodeError,
    call_user,
    check_metrics,
    load_callable,
)

from .dp_sgd import dp_sgd_loop
from .flower import flower_client


@dataclass(frozen=True)
class LocalTrainingResult:
    weights: Weights
    num_examples: int
    metrics: dict[str, float]
    seconds: float

    @property
    def loss(self) -> float:
        return self.metrics.get("train_loss", float("nan"))

    @property
    def accuracy(self) -> float:
        return self.metrics.get("train_accuracy", float("nan"))


def loss_function(config: TrainingConfig, task: str) -> str:
    if config.loss != "auto":
        return config.loss
    return "cross_entropy" if task == "classification" else "mse"


def _loss(kind: str, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "cross_entropy":
        return F.cross_entropy(outputs, target)
    predictions = outputs.reshape(-1)
    if kind == "l1":
        return F.l1_loss(predictions, target.reshape(-1))
    return F.mse_loss(predictions, target.reshape(-1))


def supervised_loop(
    model: nn.Module,
    data: SiteDataset,
    config: TrainingConfig,
    seed: int,
    privacy: PrivacyConfig | None = None,
) -> dict[str, float]:
    """Mini-batch training for ``config.local_epochs`` epochs, shuffled by ``seed``; with
    ``privacy.mode: record``, DP-SGD (:mod:`.dp_sgd`).

    The returned loss (and accuracy, for classification) is over the last epoch's batches.
    """
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(
            parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            parameters,
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    kind = loss_function(config, data.task)
    classify = kind == "cross_entropy"
    if privacy is not None and privacy.mode == "record":
        return dp_sgd_loop(
            model, optimizer, data, config, privacy, seed, functools.partial(_loss, kind), classify
        )
    model.train()
    features, labels = data.features, data.labels
    n = len(labels)
    total_loss, correct = 0.0, 0
    for _ in range(config.local_epochs):
        total_loss, correct = 0.0, 0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            outputs = model(features[batch])
            loss = _loss(kind, outputs, labels[batch])
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            if classify:
                correct += int((outputs.argmax(dim=1) == labels[batch]).sum())
    metrics = {"train_loss": total_loss / max(n, 1)}
    if classify:
        metrics["train_accuracy"] = correct / max(n, 1)
    return metrics


@contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Interrupt ``what`` after ``seconds`` (a hung user function, for example).

    Uses a real-time timer signal, so it works where the training runs on a process's main
    thread (the embedded site hosts); elsewhere the round's deadline applies.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise UserCodeError(f"{what} did not finish within training.timeout_s = {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def train_locally(
    model: nn.Module,
    data: SiteDataset,
    config: TrainingConfig,
    context: RoundContext,
    hooks: Sequence[ClientHook] = (),
    privacy: PrivacyConfig | None = None,
) -> LocalTrainingResult:
    """Train ``model`` in place with the federation's ``train`` (or the supervised loop),
    the strategy's hooks routed through every gradient; return its weights and metrics.

    Whatever the user's function does wrong (raises, hangs past ``timeout_s``, returns
    garbage, leaves NaN weights) ends in a :class:`UserCodeError` naming it.
    """
    started = time.perf_counter()
    who = f"train function {config.train}" if config.train else "fedround's training loop"
    num_examples = len(data)
    # A Flower NumPyClient (class, instance or factory) named as `train`: see flower.py.
    flower = flower_client(config.train, "train function") if config.train else None
    who = flower.who if flower is not None else who
    with hooks_installed(model, hooks), time_limit(config.timeout_s, who):
        if flower is not None:
            fit = flower.fit(model, data, config, context, hooked=bool(hooks))
            raw, num_examples = fit.metrics, fit.num_examples
        elif config.train:
            function = load_callable(config.train, "train function")
            raw = call_user(function, who, model, data, config, context)
        if config.train:
            metrics = {
                f"train_{k}" if not k.startswith("train_") else k: v
                for k, v in check_metrics(raw, who).items()
            }
        else:
            metrics = supervised_loop(model, data, config, context.seed, privacy)
    # on the CPU, whatever device the user's train moved the model to
    weights = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    bad = sorted(
        name
        for name, t in weights.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )
    if bad:
        raise UserCodeError(f"{who} left non-finite weights in {bad[:5]} (NaN or inf)")
    return LocalTrainingResult(
        weights=weights,
        num_examples=num_examples,
        metrics=metrics,
        seconds=time.perf_counter() - started,
    )
