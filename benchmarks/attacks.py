"""Malicious sites against FedAvg and each robust aggregator.

The job: 2,000 of the MNIST training images split over 20 sites by Dirichlet(α = 1.0)
labels (about 100 each), every site in every round (so "20 % malicious" means 4 of each
round's 20 updates), 1 local epoch of SGD (lr 0.1, batch 20), the 784-64-10 MLP, 20
rounds; accuracy on 1,000 held-out images. Smaller than the strategies benchmark (half the
images, 20 rounds) so that 6 aggregators × 13 scenarios fit in minutes. The malicious
sites are drawn once per seed and stay the same for every aggregator. Through the real
core strategies and site training loop (``benchmarks/fl_sim.py``).

Attacks (each malicious site trains on its shard first; the server sees only updates):

- ``sign_flip``: the site sends −Δ, its honest update negated.
- ``scale_x10``: the site sends 10·Δ (a boosted update, as in model replacement).
- ``label_flip``: the site trains on its data with every label y replaced by 9 − y.
- ``little``: "A Little Is Enough" (Baruch et al., NeurIPS 2019): the malicious sites,
  knowing the round's honest updates, all send μ − z·σ·sign(μ) (coordinate-wise mean μ and
  standard deviation σ of the honest updates), with z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − m
  for m malicious of n: a small shift every aggregator lets through, against progress.

Aggregators (``strategy:`` sections; clipping is fedround's default, median × 5, unless
``clip: off``): FedAvg without clipping, FedAvg with the default clipping, coordinate-wise
median, trimmed mean β = 0.2, Krum f = 6 and Multi-Krum f = 6 (f sized for 30 % of 20).

Reported: mean accuracy of the last 5 rounds, median over seeds, for the clean run and
every attack at 10, 20 and 30 % malicious sites, with the drop against the aggregator's
own clean run.

    .venv/bin/python benchmarks/attacks.py              # 2 seeds, ~6 min on 2 idle cores
    .venv/bin/python benchmarks/attacks.py --seeds 1 --fractions 0.2
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from fl_sim import Federation, Job, Updates, run_federated, split

from fedround.tasks.core.config import StrategyConfig
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.usercode import SiteDataset

RESULTS = Path(__file__).with_name("results") / "attacks.json"

AGGREGATORS: dict[str, dict[str, Any]] = {
    "fedavg (no clip)": {"name": "fedavg", "clip": {"mode": "off"}},
    "fedavg + clip": {"name": "fedavg"},
    "median": {"aggregator": "median"},
    "trimmed β=0.2": {"aggregator": "trimmed_mean", "trim_beta": 0.2},
    "krum f=6": {"aggregator": "krum", "krum_f": 6},
    "multi-krum f=6": {"aggregator": "multi_krum", "krum_f": 6},
}
ATTACKS = ("sign_flip", "scale_x10", "label_flip", "little")
CLEAN = "clean"
LAST = 5  # rounds averaged for the accuracy figure


def normal_quantile(p: float) -> float:
    """Φ⁻¹(p) by bisection on math.erf (no SciPy needed)."""
    low, high = -10.0, 10.0
    for _ in range(200):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def little_is_enough_z(n: int, m: int) -> float:
    s = math.floor(n / 2 + 1) - m
    return normal_quantile((n - s) / n)


def attack_updates(kind: str, round_: int, updates: Updates, bad: frozenset[str]) -> Updates:
    """Rewrite the malicious sites' updates (``updates`` holds every site's honest one)."""
    del round_
    attacked = dict(updates)
    mine = sorted(bad & set(updates))
    if kind == "sign_flip":
        for site in mine:
            delta, n = updates[site]
            attacked[site] = ({k: -v for k, v in delta.items()}, n)
    elif kind == "scale_x10":
        for site in mine:
            delta, n = updates[site]
            attacked[site] = ({k: 10 * v for k, v in delta.items()}, n)
    elif kind == "little":
        honest = [updates[s][0] for s in sorted(updates)]
        z = little_is_enough_z(len(updates), len(mine))
        shifted: Weights = {}
        for name in honest[0]:
            stacked = torch.stack([u[name].to(torch.float64) for u in honest])
            mean, std = stacked.mean(dim=0), stacked.std(dim=0, unbiased=False)
            shifted[name] = (mean - z * std * torch.sign(mean)).to(honest[0][name].dtype)
        for site in mine:
            attacked[site] = (shifted, updates[site][1])
    return attacked


def flipped(federation: Federation, sites: list[str]) -> dict[str, SiteDataset]:
    return {
        site: SiteDataset(
            federation.sites[site].features, 9 - federation.sites[site].labels, num_classes=10
        )
        for site in sites
    }


def malicious_sites(names: list[str], fraction: float, seed: int) -> list[str]:
    count = round(fraction * len(names))
    return sorted(random.Random(f"malicious/{seed}").sample(names, count))


def run_seed(job: Job, seed: int, fractions: list[float], names: list[str]) -> dict[str, Any]:
    """Every aggregator, clean and under every attack and fraction, on one seed's split."""
    torch.set_num_threads(1)
    federation = split(job, seed)
    results: dict[str, Any] = {}
    for name in names:
        config = StrategyConfig(**AGGREGATORS[name])
        runs: dict[str, Any] = {CLEAN: run_federated(job, federation, config, seed).accuracy}
        for fraction in fractions:
            bad = malicious_sites(federation.names, fraction, seed)
            for kind in ATTACKS:
                key = f"{kind}@{fraction:.0%}"
                if kind == "label_flip":
                    history = run_federated(
                        job,
                        federation,
                        config,
                        seed,
                        malicious=bad,
                        poisoned=flipped(federation, bad),
                    )
                else:
                    history = run_federated(
                        job,
                        federation,
                        config,
                        seed,
                        attack=partial(attack_updates, kind),
                        malicious=bad,
                    )
                runs[key] = history.accuracy
        results[name] = runs
    return results


def last_mean(accuracy: list[float]) -> float:
    tail = accuracy[-LAST:]
    return statistics.fmean(tail) if all(math.isfinite(a) for a in tail) else float("nan")


def summarize(per_seed: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name in names:
        keys = per_seed[0][name].keys()
        table[name] = {
            key: statistics.median(last_mean(run[name][key]) for run in per_seed) for key in keys
        }
    return table


def print_table(table: dict[str, dict[str, float]], fractions: list[float]) -> None:
    for fraction in fractions:
        print(f"\n{fraction:.0%} malicious sites: accuracy % (last {LAST} rounds), Δ vs own clean")
        header = f"{'aggregator':<17}{'clean':>7}" + "".join(f"{kind:>17}" for kind in ATTACKS)
        print(header)
        print("-" * len(header))
        for name, row in table.items():
            clean = row[CLEAN]
            cells = []
            for kind in ATTACKS:
                value = row[f"{kind}@{fraction:.0%}"]
                cells.append(f"{100 * value:6.1f} ({100 * (value - clean):+5.1f})")
            print(f"{name:<17}{100 * clean:>7.1f}" + "".join(f"{c:>17}" for c in cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.2, 0.3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(AGGREGATORS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    job = Job(
        sites=args.sites,
        alpha=args.alpha,
        fraction=1.0,
        rounds=args.rounds,
        local_epochs=1,
        batch_size=20,
        learning_rate=0.1,
        train_size=2000,
        min_examples=10,
    )
    names = args.only or list(AGGREGATORS)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    # one task per (seed, aggregator): spreads the work over the workers evenly
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {
            (seed, name): pool.submit(run_seed, job, seed, args.fractions, [name])
            for seed in seeds
            for name in names
        }
        per_seed: list[dict[str, Any]] = [{} for _ in seeds]
        for (seed, name), future in futures.items():
            per_seed[seed][name] = future.result()[name]
    table = summarize(per_seed, names)
    print(
        f"{job.sites} sites, Dirichlet α={job.alpha}, all sites every round, "
        f"{job.local_epochs} local epoch, {job.rounds} rounds, seeds {seeds} (medians)"
    )
    print_table(table, args.fractions)
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.0f}s on {args.workers} worker process(es), one torch thread each")
    z = {f"{f:.0%}": little_is_enough_z(job.sites, round(f * job.sites)) for f in args.fractions}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "attacks",
                "job": job.describe(),
                "aggregators": {name: AGGREGATORS[name] for name in names},
                "attacks": list(ATTACKS),
                "little_is_enough_z": z,
                "fractions": args.fractions,
                "seeds": seeds,
                "accuracy_last_rounds": LAST,
                "summary": table,
                "per_seed": per_seed,
                "seconds": seconds,
                "torch": torch.__version__,
                "finished_at": datetime.now(UTC).isoformat(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
