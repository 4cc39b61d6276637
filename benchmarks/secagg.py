"""What secure aggregation costs a round: time and bytes at 10 and 50 sites, against the
same run without it, both measured here, one after the other.

Each run is the real ``fedround run`` on the embedded default (local Prefect and MLflow,
a local object store, the sites in local site hosts): the demo's model (46,730
parameters) on the demo's 4,000 MNIST images split across the sites, every site in every
round, fedavg. With ``secure_aggregation.enabled`` each round adds the three exchanges
after training (shares, masked updates, unmasking) through the object store.

Reported per size (medians over the rounds after the first): round time with and without
secure aggregation and their ratio (goal: at most 2× at 50 sites), the seconds of each
secure step, and the bytes the sites uploaded per round (secure: the masked updates at
32 bits per parameter, the encrypted shares and the unmasking shares; plain: the float32
updates), each with the upload of one site.

    .venv/bin/python benchmarks/secagg.py [--sizes 10 50] [--rounds 4] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_run import run_cli

ROOT = Path(__file__).resolve().parents[1]
FEDROUND = str(Path(sys.executable).with_name("fedround"))
STEPS = ("keys", "shares", "masked", "unmask")


def config(sites: int, rounds: int, secure: bool) -> dict[str, Any]:
    return {
        "federation": f"secagg-bench-{sites}",
        "seed": 42,
        "rounds": rounds,
        "data": {
            "source": "mnist",
            "train_size": 4000,
            "test_size": 1000,
            "split_seed": 42,
            "partition": {"kind": "iid", "min_examples_per_site": 10},
        },
        "model": {"architecture": "mnist_cnn", "conv1": 16, "conv2": 32, "hidden": 64},
        "training": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05},
        "selection": {"fraction": 1.0, "min_sites": 2, "deadline_s": 600},
        "secure_aggregation": {"enabled": secure},
        "contract": str(ROOT / "deployments/examples/contracts/mnist-site-data.json"),
        "sites": [{"name": f"site-{i:02d}"} for i in range(1, sites + 1)],
    }


def run(sites: int, rounds: int, processes: int, secure: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedround-secagg-") as tmp:
        path = Path(tmp) / "federation.yaml"
        path.write_text(yaml.safe_dump(config(sites, rounds, secure)))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(
            {
                "FEDROUND_STATE_DIR": str(Path(tmp) / "state"),
                "FEDROUND_SITE_PROCESSES": str(processes),
            }
        )
        try:
            result, seconds = run_cli([FEDROUND, "run", str(path), "--json"], env)
        finally:
            run_cli_down(env)
    later = result["history"][1:] or result["history"]
    figures: dict[str, Any] = {
        "round_seconds": statistics.median(h["round_seconds"] for h in later),
        "command_seconds": seconds,
        "accuracy": result["final_metrics"]["accuracy"],
    }
    up = [h["bytes_up"] + h.get("secagg_bytes_up", 0.0) for h in later]
    figures["bytes_up_per_round"] = statistics.median(up)
    figures["bytes_up_per_site"] = figures["bytes_up_per_round"] / sites
    if secure:
        for step in STEPS:
            figures[f"{step}_seconds"] = statistics.median(
                h[f"secagg_{step}_seconds"] for h in later
            )
        figures["sites_summed"] = statistics.median(h["secagg_sites"] for h in later)
    return figures


def run_cli_down(env: dict[str, str]) -> None:
    """Stop the local servers the run started for its state folder."""
    subprocess.run([FEDROUND, "down"], env=env, capture_output=True, check=False, timeout=120)


def compare(sizes: list[int], rounds: int, processes: int) -> dict[str, Any]:
    """For each size: the plain run, then the secure run, and their ratios (printed too)."""
    results: dict[str, Any] = {}
    for sites in sizes:
        plain = run(sites, rounds, processes, secure=False)
        secure = run(sites, rounds, processes, secure=True)
        results[str(sites)] = {
            "plain": plain,
            "secure": secure,
            "round_ratio": secure["round_seconds"] / plain["round_seconds"],
            "bytes_ratio": secure["bytes_up_per_round"] / plain["bytes_up_per_round"],
        }
        print(
            f"{sites:>3} sites: round {plain['round_seconds']:.2f} s plain, "
            f"{secure['round_seconds']:.2f} s secure ({results[str(sites)]['round_ratio']:.2f}×; "
            + ", ".join(f"{step} {secure[f'{step}_seconds']:.3f} s" for step in STEPS)
            + f"); up per site {plain['bytes_up_per_site'] / 1024:.0f} KiB plain, "
            f"{secure['bytes_up_per_site'] / 1024:.0f} KiB secure; accuracy "
            f"{plain['accuracy']:.3f} / {secure['accuracy']:.3f}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/secagg.json")
    args = parser.parse_args()
    results = compare(args.sizes, args.rounds, args.processes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
