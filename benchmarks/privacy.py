"""Accuracy of client-level DP-FedAvg on the demo's MNIST at ε = 1, 3, 8 and ∞ (δ = 1e-5),
central and local noise.

Everything that decides the numbers is fedround's own code, in one process
(:mod:`benchmarks.fl_sim`): the split, site selection, local training, the sites' DP hooks
(:func:`fedround.tasks.core.hooks.hooks_for` with the ``privacy`` section: clipping, and
local noise), the coordinator's wrapper (:func:`fedround.tasks.core.privacy.dp_fedavg.
wrap_strategy`: equal weights, fixed denominator, central noise) and the accountant:
σ for each ε is :func:`fedround.tasks.core.privacy.calibrate` over the run's T rounds at
q = sampled/all sites (central), or q = 1 (local: the coordinator knows who took part, so
there is no amplification by subsampling).

ε = ∞ is the same clipped, equally weighted FedAvg without noise. One run per setting
(seeded); the spread across seeds is not measured here.

Run: ``.venv/bin/python benchmarks/privacy.py [--rounds 30] [--sites 100]``; writes
``benchmarks/results/privacy.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fl_sim import Job, evaluate, site_context, split

from fedround.site_workers.training import train_locally
from fedround.tasks.core.config import PrivacyConfig, StrategyConfig
from fedround.tasks.core.hooks import apply_update_hooks, hooks_for
from fedround.tasks.core.models import build_model
from fedround.tasks.core.privacy import calibrate, epsilon
from fedround.tasks.core.privacy.dp_fedavg import wrap_strategy
from fedround.tasks.core.selection import select_sites
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.strategies import build_strategy

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0, math.inf)
SEED = 1


def run(
    job: Job, mode: str, sigma: float | None, clip_norm: float, seed: int = SEED
) -> dict[str, Any]:
    """``job.rounds`` rounds of DP-FedAvg (``sigma=None``: clipped, no noise)."""
    started = time.perf_counter()
    federation = split(job, seed)
    torch.manual_seed(seed)
    model = build_model(job.model, seed=seed)
    weights: Weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = StrategyConfig(weighting="uniform")
    noisy = sigma is not None
    privacy = PrivacyConfig(
        mode="local" if mode == "local" and noisy else "central",
        noise_multiplier=sigma if noisy else 1.0,
        clip_norm=clip_norm,
        noise_seed=seed,
    )
    accuracy = []
    for round_ in range(1, job.rounds + 1):
        selected = select_sites(federation.names, job.fraction, 1, seed, round_)
        server = build_strategy(strategy)
        if noisy:
            assert sigma is not None
            dp = wrap_strategy(server, privacy.mode, sigma, clip_norm, len(selected), seed + round_)
        else:  # ε = ∞: clipping, equal weights, a noise of zero
            dp = wrap_strategy(server, "central", 1e-12, clip_norm, len(selected), seed)
        dp.begin_round(weights)
        for site in selected:
            context = site_context(site, seed, round_)
            model.load_state_dict(weights)
            hooks = hooks_for(strategy, weights, privacy, context.seed)
            local = train_locally(model, federation.sites[site], job.training, context, hooks)
            delta = {n: local.weights[n] - weights[n] for n in weights}
            dp.accumulate(apply_update_hooks(hooks, delta), len(federation.sites[site]))
        weights = dp.finish()
        accuracy.append(evaluate(model, weights, federation.test)["accuracy"])
    return {
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(accuracy),
        "accuracy": accuracy,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/privacy.json")
    args = parser.parse_args()
    job = Job(
        sites=args.sites,
        alpha=None,
        fraction=args.fraction,
        rounds=args.rounds,
        local_epochs=1,
        learning_rate=0.1,
        min_examples=1,
    )
    sampled = math.ceil(args.fraction * args.sites)
    q_central = sampled / args.sites
    results: dict[str, Any] = {
        "job": job.describe(),
        "delta": DELTA,
        "clip_norm": args.clip_norm,
        "sampling_rate": q_central,
        "runs": [],
    }
    for mode in ("central", "local"):
        q = q_central if mode == "central" else 1.0
        for target in EPSILONS:
            sigma = None if math.isinf(target) else calibrate(target, q, job.rounds, DELTA)
            outcome = run(job, mode, sigma, args.clip_norm)
            spent = math.inf if sigma is None else epsilon(sigma, q, job.rounds, DELTA)
            row = {
                "mode": mode,
                "target_epsilon": None if math.isinf(target) else target,
                "epsilon": None if math.isinf(spent) else spent,
                "noise_multiplier": sigma,
                "noise_on_mean_per_coordinate": (
                    None
                    if sigma is None
                    else sigma
                    * args.clip_norm
                    / (sampled if mode == "central" else 1)
                    / (1 if mode == "central" else math.sqrt(sampled))
                ),
                **{k: v for k, v in outcome.items() if k != "accuracy"},
                "accuracy_by_round": outcome["accuracy"],
            }
            results["runs"].append(row)
            print(
                f"{mode:<8} ε={'∞' if sigma is None else f'{target:g}':<4} "
                f"σ={'-' if sigma is None else f'{sigma:.3f}':<7} "
                f"accuracy {outcome['final_accuracy']:.3f} (best {outcome['best_accuracy']:.3f}) "
                f"{outcome['seconds']:.0f}s",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
