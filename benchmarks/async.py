"""Asynchronous buffered rounds (FedBuff) against synchronous rounds when some sites are slow.

A federation of 20 sites (MNIST, Dirichlet α = 0.5) in which 20 % of the sites are 5×
slower than the others. Both modes keep the same number of sites training at once (the
4 that a synchronous round samples):

- **sync**: each round samples 4 sites, waits for the slowest of them, and averages the
  four updates (FedAvg, example-weighted, with the default median-norm clipping);
- **async** (:class:`fedround.tasks.core.strategies.BufferedAsync`): whenever a site
  finishes, its delta goes into the buffer (weighted by its staleness) and another idle
  site starts on the current model; every K deltas make a new global model.

Local training, site seeds, the data split and the aggregation are fedround's own code
(see ``fl_sim.py``); what is simulated is the clock: a site's local training takes
``examples × epochs × 1 ms`` of simulated time (× 5 at a slow site), so the result does
not depend on the load of the machine. Both modes get the same simulated time budget,
the time the synchronous run needs for ``--rounds`` rounds.

Prints, per mode (medians over seeds): simulated time to reach the target accuracy, the
accuracy at the end of the budget, local trainings done, updates rejected as too stale.
Writes ``benchmarks/results/async.json`` and a plot of accuracy against simulated time
(``async.png``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from fl_sim import Federation, Job, evaluate, local_update, site_context, split

from fedround.tasks.core.config import StrategyConfig
from fedround.tasks.core.models import build_model
from fedround.tasks.core.selection import derive_seed, select_sites
from fedround.tasks.core.serialization import Weights
from fedround.tasks.core.strategies import BufferedAsync, build_strategy

RESULTS = Path(__file__).parent / "results" / "async.json"
MS_PER_EXAMPLE_EPOCH = 1.0  # simulated local-training cost
FEDAVG = StrategyConfig()


@dataclass
class Trace:
    """Global accuracy against simulated seconds, and what the run did."""

    times: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    trainings: int = 0
    rejected: int = 0
    versions: int = 0
    seconds: float = 0.0  # real seconds the simulation took

    def record(self, at: float, accuracy: float) -> None:
        self.times.append(at)
        self.accuracy.append(accuracy)

    def summary(self, target: float, budget: float, last: int = 5) -> dict[str, Any]:
        inside = [a for t, a in zip(self.times, self.accuracy, strict=True) if t <= budget]
        reached = next(
            (t for t, a in zip(self.times, self.accuracy, strict=True) if a >= target), None
        )
        return {
            "time_to_target_s": reached,
            "final_accuracy": inside[-1] if inside else None,
            "last_mean": statistics.fmean(inside[-last:]) if inside else None,
            "trainings": self.trainings,
            "rejected_stale": self.rejected,
            "versions": self.versions,
            "real_seconds": self.seconds,
            "times": self.times,
            "accuracy": self.accuracy,
        }


def durations(federation: Federation, job: Job, seed: int, slow_share: float, slowdown: float):
    """Simulated seconds of one local training at each site; which sites are slow."""
    names = federation.names
    slow = set(random.Random(seed).sample(names, round(slow_share * len(names))))
    per_site = {
        name: len(federation.sites[name])
        * job.local_epochs
        * MS_PER_EXAMPLE_EPOCH
        / 1000
        * (slowdown if name in slow else 1.0)
        for name in names
    }
    return per_site, sorted(slow)


def _accuracy(model: torch.nn.Module, weights: Weights, federation: Federation) -> float:
    return evaluate(model, weights, federation.test)["accuracy"]


def run_sync(
    job: Job, federation: Federation, seed: int, cost: dict[str, float]
) -> tuple[Trace, float]:
    """``job.rounds`` synchronous rounds; returns the trace and the simulated time used."""
    started = time.perf_counter()
    model = build_model(job.model, seed=seed)
    weights: Weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server = build_strategy(FEDAVG, population=len(federation.names))
    trace, clock = Trace(), 0.0
    trace.record(0.0, _accuracy(model, weights, federation))
    for round_ in range(1, job.rounds + 1):
        selected = select_sites(federation.names, job.fraction, 1, seed, round_)
        server.begin_round(weights)
        updates = {}
        for site in selected:
            context = site_context(site, seed, round_)
            data = federation.sites[site]
            delta = local_update(model, weights, data, job, FEDAVG, context)
            updates[site] = (delta, len(data))
            trace.trainings += 1
        for site in sorted(updates):
            server.preview(*updates[site])
        for site in sorted(updates):
            server.accumulate(*updates[site])
        weights = server.finish()
        clock += max(cost[site] for site in selected)  # the round waits for its slowest
        trace.versions += 1
        trace.record(clock, _accuracy(model, weights, federation))
    trace.seconds = time.perf_counter() - started
    return trace, clock


def run_async(
    job: Job,
    federation: Federation,
    seed: int,
    cost: dict[str, float],
    budget: float,
    buffer_size: int,
    max_staleness: int,
) -> Trace:
    """FedBuff for ``budget`` simulated seconds with as many sites training at once as a
    synchronous round samples."""
    started = time.perf_counter()
    model = build_model(job.model, seed=seed)
    weights: Weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server = BufferedAsync(weights, buffer_size=buffer_size, max_staleness=max_staleness)
    concurrency = len(select_sites(federation.names, job.fraction, 1, seed, 1))
    rng = random.Random(derive_seed(seed, "async"))
    trace = Trace()
    trace.record(0.0, _accuracy(model, weights, federation))
    running: list[tuple[float, int, str, Weights, int]] = []  # (done at, order, site, Δ, v)
    busy: set[str] = set()
    order = 0

    def start(at: float) -> None:
        nonlocal order
        site = rng.choice(sorted(set(federation.names) - busy))
        busy.add(site)
        order += 1
        context = site_context(site, seed, order)
        delta = local_update(model, server.weights, federation.sites[site], job, FEDAVG, context)
        trace.trainings += 1
        heapq.heappush(running, (at + cost[site], order, site, delta, server.version))

    for _ in range(concurrency):
        start(0.0)
    while running:
        done_at, _, site, delta, version = heapq.heappop(running)
        if done_at > budget:
            break
        busy.discard(site)
        outcome = server.submit(delta, version)
        if not outcome.accepted:
            trace.rejected += 1
        if outcome.applied:
            trace.versions += 1
            trace.record(done_at, _accuracy(model, server.weights, federation))
        start(done_at)
    trace.seconds = time.perf_counter() - started
    return trace


def run_seed(job: Job, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    federation = split(job, seed)
    cost, slow = durations(federation, job, seed, args.slow_share, args.slowdown)
    sync, budget = run_sync(job, federation, seed, cost)
    out: dict[str, Any] = {
        "slow_sites": slow,
        "budget_s": budget,
        "sync": sync.summary(args.target, budget),
    }
    for k in args.buffer:
        trace = run_async(job, federation, seed, cost, budget, k, args.max_staleness)
        out[f"async K={k}"] = trace.summary(args.target, budget)
    return out


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if len(present) == len(values) else None


def summarize(per_seed: list[dict[str, Any]], modes: list[str]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for mode in modes:
        runs = [seed[mode] for seed in per_seed]
        table[mode] = {
            key: _median([r[key] for r in runs])
            for key in ("time_to_target_s", "final_accuracy", "last_mean", "trainings")
        }
        table[mode]["rejected_stale"] = sum(r["rejected_stale"] for r in runs)
        table[mode]["seeds_reaching_target"] = sum(r["time_to_target_s"] is not None for r in runs)
    return table


def plot(per_seed: list[dict[str, Any]], modes: list[str], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for index, mode in enumerate(modes):
        run = per_seed[0][mode]
        ax.plot(run["times"], run["accuracy"], label=mode, color=f"C{index}")
    ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.0%}")
    ax.set_xlabel("simulated seconds")
    ax.set_ylabel("global accuracy")
    ax.set_title("20 % of sites 5× slower: sync rounds vs FedBuff (seed 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n−1 (medians)")
    parser.add_argument("--rounds", type=int, default=40, help="sync rounds = the time budget")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--slow-share", type=float, default=0.2)
    parser.add_argument("--slowdown", type=float, default=5.0)
    parser.add_argument("--buffer", type=int, nargs="+", default=[2, 4], help="FedBuff's K")
    parser.add_argument("--max-staleness", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--workers", type=int, default=2, help="seeds run in parallel")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if any(k < 1 for k in args.buffer) or args.max_staleness < 1:
        parser.error("--buffer values and --max-staleness must be ≥ 1")
    job = Job(
        sites=args.sites,
        alpha=args.alpha,
        fraction=args.fraction,
        rounds=args.rounds,
        local_epochs=1,
        min_examples=5,
    )
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(seeds)))) as pool:
        per_seed = list(pool.map(run_seed, [job] * len(seeds), seeds, [args] * len(seeds)))
    modes = ["sync", *(f"async K={k}" for k in args.buffer)]
    table = summarize(per_seed, modes)
    budget = statistics.median(s["budget_s"] for s in per_seed)
    print(
        f"{args.sites} sites, Dirichlet {args.alpha}, {args.slow_share:.0%} of them "
        f"{args.slowdown:g}× slower, {len(seeds)} seeds (medians); budget = {args.rounds} "
        f"sync rounds = {budget:.1f} simulated s; target {args.target:.0%}"
    )
    print(f"{'mode':<12}{'to target':>11}{'final':>8}{'last 5':>8}{'trainings':>11}{'stale':>7}")
    for mode, row in table.items():
        reach = row["time_to_target_s"]
        reach_text = f"{reach:.1f} s" if reach is not None else "—"
        print(
            f"{mode:<12}{reach_text:>11}{100 * row['final_accuracy']:>7.1f}%"
            f"{100 * row['last_mean']:>7.1f}%{row['trainings']:>11.0f}{row['rejected_stale']:>7}"
        )
    sync_reach = table["sync"]["time_to_target_s"]
    for mode in modes[1:]:
        reach = table[mode]["time_to_target_s"]
        if sync_reach and reach:
            print(f"{mode}: reaches the target in {reach / sync_reach:.2f}× the sync time")
    seconds = time.perf_counter() - started
    print(f"{seconds:.0f}s of real time")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot(per_seed, modes, args.target, args.output.with_suffix(".png"))
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "async",
                "job": job.describe(),
                "slow_share": args.slow_share,
                "slowdown": args.slowdown,
                "ms_per_example_epoch": MS_PER_EXAMPLE_EPOCH,
                "max_staleness": args.max_staleness,
                "target": args.target,
                "seeds": seeds,
                "summary": table,
                "per_seed": per_seed,
                "seconds": seconds,
                "machine": {"arch": platform.machine(), "torch": torch.__version__},
                "finished_at": datetime.now(UTC).isoformat(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
