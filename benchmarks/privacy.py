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

``adaptive`` is central noise with adaptive clipping (Andrew et al., NeurIPS 2021:
:mod:`fedround.tasks.core.privacy.adaptive_clipping`), starting from the same C and moving
it towards the median update norm; its ε is the same as central's at the same σ.

``record`` is record-level DP-SGD at the sites (``privacy.mode: record``, Opacus through
:func:`fedround.site_workers.training.train_locally`): every example's gradient clipped to
``--record-clip-norm``, noise on each Poisson-sampled batch, plain FedAvg at the
coordinator. σ is calibrated over what the ledger charges the tenant: every round, the
largest site's q = 1/⌈n/B⌉ and its ``local_epochs``·⌈n/B⌉ steps (a bound on every example,
whichever sites were sampled).

ε = ∞ is the same clipped, equally weighted FedAvg without noise (record: DP-SGD's
clipping without noise). ``--seeds N`` runs every
setting with N seeds (split, selection, training and noise all follow the seed) and
reports the median and the range of the final accuracy.

Secure aggregation's cost (round time and bytes at 10 and 50 sites against the same run
without it, through the real ``fedround run``) is :mod:`benchmarks.secagg`; ``--secagg-sizes
10 50`` runs it from here too, ``--modes ''`` only it.

Run: ``.venv/bin/python benchmarks/privacy.py [--rounds 30] [--sites 100] [--seeds 3]
[--modes central,adaptive,local,record] [--secagg-sizes 10 50]``; writes
``benchmarks/results/privacy.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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
from fedround.tasks.core.privacy.adaptive_clipping import AdaptiveClipping
from fedround.tasks.core.privacy.dp_fedavg import wrap_strategy
from fedround.tasks.core.privacy.record import dp_steps
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
    if mode == "record":
        return _run_record(job, sigma, clip_norm, seed, started)
    adaptive = AdaptiveClipping() if mode == "adaptive" else None
    privacy = PrivacyConfig(
        mode="local" if mode == "local" and noisy else "central",
        noise_multiplier=sigma if noisy else 1.0,
        clip_norm=clip_norm,
        noise_seed=seed,
        adaptive_clipping={} if adaptive is not None else None,  # type: ignore[arg-type]
    )
    accuracy, clip_norms = [], []
    state: dict[str, Any] = {}
    for round_ in range(1, job.rounds + 1):
        selected = select_sites(federation.names, job.fraction, 1, seed, round_)
        server = build_strategy(strategy)
        if noisy:
            assert sigma is not None
            dp = wrap_strategy(
                server, privacy.mode, sigma, clip_norm, len(selected), seed + round_, adaptive
            )
        else:  # ε = ∞: clipping, equal weights, a noise of zero
            dp = wrap_strategy(server, "central", 1e-12, clip_norm, len(selected), seed, adaptive)
        dp.load_state_dict(state)  # adaptive clipping's C, as a checkpoint carries it
        clip_norms.append(getattr(dp, "clip_norm", clip_norm))
        dp.begin_round(weights)
        for site in selected:
            context = site_context(site, seed, round_)
            model.load_state_dict(weights)
            hooks = hooks_for(strategy, weights, privacy, context.seed)
            local = train_locally(model, federation.sites[site], job.training, context, hooks)
            delta = {n: local.weights[n] - weights[n] for n in weights}
            dp.accumulate(apply_update_hooks(hooks, delta), len(federation.sites[site]))
        weights = dp.finish()
        state = dp.state_dict()
        accuracy.append(evaluate(model, weights, federation.test)["accuracy"])
    return {
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(accuracy),
        "accuracy": accuracy,
        "clip_norm_by_round": clip_norms,
        "seconds": time.perf_counter() - started,
    }


def record_plan(job: Job) -> tuple[float, int]:
    """(q, steps) the ledger charges the tenant per round: the largest site's."""
    largest = max(len(examples) for examples in split(job, SEED).sites.values())
    return dp_steps(largest, job.batch_size, job.local_epochs)


def _run_record(
    job: Job, sigma: float | None, clip_norm: float, seed: int, started: float
) -> dict[str, Any]:
    """``job.rounds`` rounds of FedAvg over sites that train with DP-SGD."""
    federation = split(job, seed)
    torch.manual_seed(seed)
    model = build_model(job.model, seed=seed)
    weights: Weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    privacy = PrivacyConfig(
        mode="record",
        noise_multiplier=sigma if sigma is not None else 1e-9,
        clip_norm=clip_norm,
        noise_seed=seed,
    )
    accuracy = []
    for round_ in range(1, job.rounds + 1):
        selected = select_sites(federation.names, job.fraction, 1, seed, round_)
        server = build_strategy(StrategyConfig())
        server.begin_round(weights)
        for site in selected:
            context = site_context(site, seed, round_)
            model.load_state_dict(weights)
            data = federation.sites[site]
            local = train_locally(model, data, job.training, context, (), privacy)
            server.accumulate({n: local.weights[n] - weights[n] for n in weights}, len(data))
        weights = server.finish()
        accuracy.append(evaluate(model, weights, federation.test)["accuracy"])
    return {
        "final_accuracy": accuracy[-1],
        "best_accuracy": max(accuracy),
        "accuracy": accuracy,
        "clip_norm_by_round": [clip_norm] * job.rounds,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=1, help="runs per setting (spread)")
    parser.add_argument("--modes", default="central,adaptive,local,record")
    parser.add_argument(
        "--record-clip-norm", type=float, default=1.0, help="record: C of one example's gradient"
    )
    parser.add_argument(
        "--secagg-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also time secure aggregation against plain rounds at these site counts "
        "(benchmarks/secagg.py, e.g. 10 50)",
    )
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
    for mode in [mode for mode in args.modes.split(",") if mode]:
        q = q_central if mode != "local" else 1.0
        steps = job.rounds
        clip_norm = args.clip_norm
        if mode == "record":
            q, per_round = record_plan(job)
            steps, clip_norm = per_round * job.rounds, args.record_clip_norm
        for target in EPSILONS:
            sigma = None if math.isinf(target) else calibrate(target, q, steps, DELTA)
            outcomes = [run(job, mode, sigma, clip_norm, seed=SEED + i) for i in range(args.seeds)]
            finals = sorted(o["final_accuracy"] for o in outcomes)
            spent = math.inf if sigma is None else epsilon(sigma, q, steps, DELTA)
            row = {
                "mode": mode,
                "target_epsilon": None if math.isinf(target) else target,
                "epsilon": None if math.isinf(spent) else spent,
                "noise_multiplier": sigma,
                "seeds": args.seeds,
                "final_accuracy_median": statistics.median(finals),
                "final_accuracy_min": finals[0],
                "final_accuracy_max": finals[-1],
                "final_accuracy": [o["final_accuracy"] for o in outcomes],
                "seconds": [o["seconds"] for o in outcomes],
                "clip_norm_last_round": [o["clip_norm_by_round"][-1] for o in outcomes],
                "accuracy_by_round": [o["accuracy"] for o in outcomes],
            }
            results["runs"].append(row)
            print(
                f"{mode:<8} ε={'∞' if sigma is None else f'{target:g}':<4} "
                f"σ={'-' if sigma is None else f'{sigma:.3f}':<7} "
                f"accuracy median {row['final_accuracy_median']:.3f} "
                f"[{finals[0]:.3f}, {finals[-1]:.3f}] over {args.seeds} seed(s), "
                f"last C {statistics.median(row['clip_norm_last_round']):.3g}, "
                f"{sum(row['seconds']):.0f}s",
                flush=True,
            )
    if args.secagg_sizes:
        from secagg import compare

        results["secure_aggregation"] = compare(args.secagg_sizes, rounds=6, processes=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
