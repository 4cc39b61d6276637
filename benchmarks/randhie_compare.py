"""The RAND HIE example: the federated model against each plan training alone and against
training on all the data pooled, on the same held-out sample.

- **federated**: the example federation (deployments/examples/randhie/federation.yaml,
  six plans, 20 rounds × 2 local epochs), run through fedround's real runtime
  (``fedround run --json``, embedded default), one run per seed.
- **centralized**: the same model (``randhie_federation.model:build``), the same ``train``
  (Adam, early stopping on 10 % of its rows) with the same budget of epochs (rounds ×
  local epochs), on all six plans' training rows pooled; standardized with the pooled
  means and standard deviations (what the federated set-up computes from summaries).
- **local only**: the same, on one plan's rows, standardized with that plan's own
  statistics (a plan training alone knows nothing else); the columns constant within the
  plan (``lncoins``, ``idp``: the plan itself) are left out, as a modeller would.

Every model is scored by the example's ``evaluate`` on the coordinator's held-out sample
(``holdout.parquet``: 15 % of every plan, which no site holds). Plain torch in this
process for the baselines; seeds fixed; medians over ``--seeds``. Goal (issue): the
federated AUC within 1 point (AUC × 100) of the centralized one and above the mean of the
local-only models. Prints a table and writes ``benchmarks/results/randhie_compare.json``.

Needs the example package: ``pip install deployments/examples/randhie`` (scripts/randhie.sh
does it).

    .venv/bin/python benchmarks/randhie_compare.py [--seeds 1 2 3] [--rounds 20]
        [--federated-from benchmarks/results/randhie_compare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from cli_run import run_cli

from fedround.api import RoundContext, SiteDataset, TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deployments" / "examples" / "randhie"
RESULTS = ROOT / "benchmarks" / "results"
FEDROUND = Path(sys.executable).with_name("fedround")

try:
    from randhie_federation.data import FEATURES, LABEL, SITES
    from randhie_federation.evaluation import evaluate
    from randhie_federation.model import build
    from randhie_federation.prepare import prepare
    from randhie_federation.training import train
except ImportError:
    sys.exit("install the example first: .venv/bin/pip install deployments/examples/randhie")


def standardizer(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Means and standard deviations as fedround's federated set-up computes them
    (population variance). A column constant in ``frame`` gets standard deviation 0: the
    model is not shown it (a plan alone sees one value of its own lncoins and idp, so
    they say nothing to it; a modeller would drop them)."""
    values = frame[FEATURES].astype(np.float64)
    mean = values.mean()
    variance = np.maximum((values**2).mean() - mean**2, 0.0)
    return mean, np.sqrt(variance).where(variance > 1e-12, 0.0)


def dataset(frame: pd.DataFrame, mean: pd.Series, std: pd.Series) -> SiteDataset:
    shown = std > 0
    scaled = (frame[FEATURES].astype(np.float64) - mean) / std.where(shown, 1.0)
    scaled.loc[:, ~shown] = 0.0
    features = scaled.to_numpy(np.float32)
    return SiteDataset(
        torch.from_numpy(features),
        torch.from_numpy(frame[LABEL].to_numpy(np.int64)),
        num_classes=2,
        feature_names=tuple(FEATURES),
    )


def trained_alone(
    rows: pd.DataFrame, holdout: pd.DataFrame, config: dict[str, Any], seed: int, who: str
) -> dict[str, float]:
    """The example's model and ``train`` on ``rows`` alone, scored on the holdout."""
    model_args = {k: v for k, v in config["model"].items() if k != "factory"}
    training = config["training"]
    settings = TrainingConfig(
        local_epochs=config["rounds"] * training["local_epochs"],
        batch_size=training["batch_size"],
        learning_rate=training["learning_rate"],
        weight_decay=training.get("weight_decay", 0.0),
    )
    mean, std = standardizer(rows)
    torch.manual_seed(seed)
    model = build(in_features=len(FEATURES), out_features=2, **model_args)
    context = RoundContext("randhie", "baseline", who, 0, seed=seed, num_classes=2)
    metrics = train(model, dataset(rows, mean, std), settings, context)
    model.eval()
    scored = evaluate(model, dataset(holdout, mean, std), context)
    return {**scored, "epochs": metrics["epochs"], "rows": float(len(rows))}


def federated(folder: Path, state: Path, seed: int, rounds: int) -> dict[str, Any]:
    config = yaml.safe_load((EXAMPLE / "federation.yaml").read_text())
    config["seed"], config["rounds"] = seed, rounds
    path = folder / f"federation-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["FEDROUND_STATE_DIR"] = str(state)
    env["FEDROUND_LOCAL_SERVER"] = "0"  # a temporary server per run, gone with it
    result, seconds = run_cli([str(FEDROUND), "run", str(path), "--json"], env)
    return {**result, "wall_seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=None, help="default: the example's")
    parser.add_argument(
        "--federated-from",
        type=Path,
        help="take the federated runs from an earlier results JSON (same seeds and rounds; "
        "the runs are reproducible) and re-run only the baselines",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # like every site process
    config = yaml.safe_load((EXAMPLE / "federation.yaml").read_text())
    rounds = args.rounds or config["rounds"]
    config["rounds"] = rounds
    rows: dict[str, list[dict[str, Any]]] = {"federated": [], "centralized": []}
    rows |= {f"local {site}": [] for site in SITES}
    earlier = None
    if args.federated_from:
        earlier = json.loads(args.federated_from.read_text())
        if (earlier["seeds"], earlier["rounds"]) != (args.seeds, rounds):
            sys.exit(
                f"{args.federated_from} has seeds {earlier['seeds']}, {earlier['rounds']} rounds"
            )
    with tempfile.TemporaryDirectory(prefix="fedround-randhie-") as tmp:
        folder, state = Path(tmp), Path(tmp) / "state"
        prepare(folder, state)
        shutil.copy(EXAMPLE / "contract.json", folder / "contract.json")
        holdout = pd.read_parquet(folder / "holdout.parquet")
        train_rows = {s: pd.read_parquet(folder / "sites" / s / "train.parquet") for s in SITES}
        pooled = pd.concat(train_rows.values(), ignore_index=True)
        for index, seed in enumerate(args.seeds):
            if earlier is not None:
                rows["federated"].append(earlier["runs"]["federated"][index])
            else:
                result = federated(folder, state, seed, rounds)
                rows["federated"].append(
                    {
                        **result["final_metrics"],
                        "median_round_seconds": result["timings"]["round_median_seconds"],
                        "wall_seconds": result["wall_seconds"],
                    }
                )
            rows["centralized"].append(trained_alone(pooled, holdout, config, seed, "pooled"))
            for site in SITES:
                rows[f"local {site}"].append(
                    trained_alone(train_rows[site], holdout, config, seed, site)
                )
            print(
                f"seed {seed}: federated {rows['federated'][-1]['auc']:.4f}, centralized "
                f"{rows['centralized'][-1]['auc']:.4f}, local mean "
                f"{statistics.mean(rows[f'local {s}'][-1]['auc'] for s in SITES):.4f}",
                flush=True,
            )
    median = {name: statistics.median(r["auc"] for r in runs) for name, runs in rows.items()}
    local_means = [
        statistics.mean(rows[f"local {s}"][i]["auc"] for s in SITES) for i in range(len(args.seeds))
    ]
    local_mean = statistics.median(local_means)
    gap = 100 * (median["centralized"] - median["federated"])
    report = {
        "rounds": rounds,
        "local_epochs": config["training"]["local_epochs"],
        "seeds": args.seeds,
        "federated_runs_from": str(args.federated_from) if args.federated_from else "this run",
        "holdout_rows": len(holdout),
        "median_auc": median,
        "median_local_only_mean_auc": local_mean,
        "centralized_minus_federated_points": gap,
        "goal_within_1_point": gap <= 1.0,
        "goal_above_local_mean": median["federated"] > local_mean,
        "runs": rows,
    }
    print()
    print(f"{'model':<20} {'AUC (median)':>12} {'accuracy':>9} {'Brier':>7}  per seed")
    for name, runs in rows.items():
        accuracy = statistics.median(r["accuracy"] for r in runs)
        brier = statistics.median(r["brier"] for r in runs)
        seeds = " ".join(f"{r['auc']:.4f}" for r in runs)
        print(f"{name:<20} {median[name]:>12.4f} {accuracy:>9.4f} {brier:>7.4f}  {seeds}")
    print(f"{'local only (mean)':<20} {local_mean:>12.4f}")
    print(
        f"centralized - federated: {gap:.2f} AUC points (goal <= 1); federated above the "
        f"local-only mean: {report['goal_above_local_mean']}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "randhie_compare.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
