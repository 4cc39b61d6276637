"""Compressed updates on the MNIST demo: bytes up per round and final accuracy for
none / 8-bit / top-k (10 %, 1 %) / both.

The real site code path, in one process: the demo's data split
(:func:`fedround.site_workers.demo_sites.split_demo_data`: ten sites, Dirichlet(0.5)),
each site's round through :func:`fedround.site_workers.site_round.run_site_round` (local
training, encoding, the error-feedback residual in the site's own state, upload to a
local object store) and the coordinator's
:func:`fedround.tasks.aggregation.aggregate_updates` (decode, validate, FedAvg), then
central evaluation on the 1,000 held-out images. Only the orchestration around it
(Prefect, MLflow, checkpoints) is left out: it does not change a byte or a weight.

"Bytes up" is what each site uploads per round: the encoded safetensors payload plus its
JSON manifest (what ``site.<site>.bytes_up`` reports in MLflow). Medians over seeds.

    .venv/bin/python benchmarks/compression.py                    # 3 seeds, 20 rounds
    .venv/bin/python benchmarks/compression.py --seeds 1 --rounds 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedround.site_workers.data import save_site_data
from fedround.site_workers.demo_sites import split_demo_data
from fedround.site_workers.settings import SiteSettings
from fedround.site_workers.site_round import RoundSpec, run_site_round
from fedround.tasks import run_context
from fedround.tasks.aggregation import aggregate_updates
from fedround.tasks.core import keys
from fedround.tasks.core.config import (
    CompressionConfig,
    FederationConfig,
    load_federation_config,
)
from fedround.tasks.core.evaluation import builtin_metrics
from fedround.tasks.core.models import build_model
from fedround.tasks.core.selection import derive_seed
from fedround.tasks.core.serialization import Weights, sha256_hex, weights_to_bytes
from fedround.tasks.core.strategies import build_strategy
from fedround.tasks.core.usercode import SiteDataset
from fedround.tasks.core.validation import UpdateExpectation, tensor_specs
from fedround.tasks.object_store import LocalObjectStore, ObjectStoreSettings

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deployments" / "examples" / "mnist-demo.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "compression.json"

VARIANTS: dict[str, CompressionConfig] = {
    "none": CompressionConfig(),
    "8-bit": CompressionConfig(quantize_bits=8),
    "top-k 10%": CompressionConfig(topk_ratio=0.1),
    "top-k 1%": CompressionConfig(topk_ratio=0.01),
    "8-bit + top-k 10%": CompressionConfig(quantize_bits=8, topk_ratio=0.1),
    "8-bit + top-k 1%": CompressionConfig(quantize_bits=8, topk_ratio=0.01),
}


def provision(config: FederationConfig, root: Path) -> tuple[dict[str, SiteSettings], SiteDataset]:
    """Each site's shard as its own train.npz (the demo's split); the held-out set."""
    split = split_demo_data(config)
    store = ObjectStoreSettings(kind="local", root=root / "store")
    sites = {}
    for entry, shard in zip(config.sites, split.site_train, strict=True):
        index = split.train[shard]
        folder = root / "sites" / entry.name
        save_site_data(folder / "train.npz", split.features[index], split.labels[index])
        sites[entry.name] = SiteSettings(
            site=entry.name,
            federation=config.federation,
            data_dir=folder,
            object_store=store,
            state_dir=root / "state" / entry.name,
        )
    holdout = SiteDataset(
        torch.from_numpy(split.features[split.test]),
        torch.from_numpy(split.labels[split.test]),
        num_classes=10,
    )
    return sites, holdout


def run_variant(
    config: FederationConfig,
    compression: CompressionConfig,
    sites: dict[str, SiteSettings],
    holdout: SiteDataset,
    store: LocalObjectStore,
    run_id: str,
) -> dict[str, Any]:
    """``config.rounds`` rounds of the whole federation with ``compression``."""
    model = build_model(config.model, seed=config.seed)
    weights: Weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rounds = []
    for round_ in range(1, config.rounds + 1):
        started = time.perf_counter()
        payload = weights_to_bytes(weights)
        store.put(keys.global_key(config.federation, run_id, round_), payload)
        results = {}
        for site, settings in sites.items():
            spec = RoundSpec(
                federation=config.federation,
                run_id=run_id,
                round=round_,
                site=site,
                nonce=f"nonce-{round_}",
                global_sha256=sha256_hex(payload),
                seed=derive_seed(config.seed, "train", round_, site),
                model=config.model,
                training=config.training,
                data=config.data,
                strategy=config.strategy,
                compression=compression,
            )
            with run_context.federation_context():
                results[site] = run_site_round(settings, spec)
        specs = tensor_specs(weights)
        expectations = {
            site: UpdateExpectation(
                federation=config.federation,
                run_id=run_id,
                round=round_,
                nonce=f"nonce-{round_}",
                site=site,
                specs=specs,
                max_bytes=config.limits.max_update_bytes,
                max_num_examples=results[site].num_examples,
            )
            for site in sites
        }
        outcome = aggregate_updates(store, build_strategy(config.strategy), weights, expectations)
        if outcome.weights is None or outcome.rejected:
            raise RuntimeError(f"round {round_}: {outcome.rejected or outcome.error}")
        weights = outcome.weights
        model.load_state_dict(weights)
        metrics = builtin_metrics(model, holdout)
        rounds.append(
            {
                "round": round_,
                "accuracy": metrics["accuracy"],
                "loss": metrics["loss"],
                "bytes_up": sum(r.nbytes_up for r in results.values()),
                "payload_bytes": sum(m.nbytes for m in outcome.manifests.values()),
                "bytes_up_dense": sum(r.metrics["bytes_up_dense"] for r in results.values()),
                "bytes_down": sum(r.nbytes_down for r in results.values()),
                "seconds": time.perf_counter() - started,
            }
        )
    return {
        "final_accuracy": rounds[-1]["accuracy"],
        "last3_accuracy": statistics.mean(r["accuracy"] for r in rounds[-3:]),
        "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rounds),
        "bytes_up_per_site_round": statistics.mean(r["bytes_up"] for r in rounds) / len(sites),
        "payload_bytes_per_round": statistics.mean(r["payload_bytes"] for r in rounds),
        "bytes_down_per_round": statistics.mean(r["bytes_down"] for r in rounds),
        "dense_bytes_per_round": statistics.mean(r["bytes_up_dense"] for r in rounds),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (model init, training)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = load_federation_config(args.config)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedround-compression-") as folder:
        root = Path(folder)
        config = base.model_copy(update={"rounds": args.rounds})
        sites, holdout = provision(config, root)
        store = LocalObjectStore(root / "store")
        for seed in range(args.seeds):
            seeded = config.model_copy(update={"seed": seed})
            for index, name in enumerate(args.variants):
                run = run_variant(
                    seeded, VARIANTS[name], sites, holdout, store, f"s{seed}-v{index}"
                )
                runs[name].append(run)
                print(
                    f"seed {seed} {name:>18}: accuracy {run['final_accuracy']:.4f}, "
                    f"{run['bytes_up_per_site_round']:,.0f} bytes up per site and round "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    summary = summarize(runs)
    print(table(summary, args.rounds, args.seeds, len(base.sites)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "config": str(
                    args.config.relative_to(ROOT)
                    if args.config.is_relative_to(ROOT)
                    else args.config
                ),
                "rounds": args.rounds,
                "seeds": args.seeds,
                "sites": len(base.sites),
                "torch": torch.__version__,
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians over seeds; ratios and accuracy differences against ``none`` (same seed)."""
    baseline = runs.get("none")
    out = {}
    for name, seeded in runs.items():
        row = {
            key: statistics.median(run[key] for run in seeded)
            for key in (
                "final_accuracy",
                "last3_accuracy",
                "bytes_up_per_round",
                "bytes_up_per_site_round",
                "payload_bytes_per_round",
                "bytes_down_per_round",
                "dense_bytes_per_round",
            )
        }
        if baseline:
            row["bytes_up_reduction"] = statistics.median(
                b["bytes_up_per_round"] / run["bytes_up_per_round"]
                for b, run in zip(baseline, seeded, strict=True)
            )
            row["accuracy_change_points"] = statistics.median(
                100 * (run["final_accuracy"] - b["final_accuracy"])
                for b, run in zip(baseline, seeded, strict=True)
            )
        out[name] = row
    return out


def table(summary: dict[str, dict[str, float]], rounds: int, seeds: int, sites: int) -> str:
    lines = [
        f"MNIST demo, {sites} sites, {rounds} rounds, median of {seeds} seed(s)",
        f"{'compression':<20}{'bytes up/site/round':>20}{'fewer bytes':>13}"
        f"{'final acc':>11}{'Δ points':>10}{'last-3 acc':>12}",
    ]
    for name, row in summary.items():
        lines.append(
            f"{name:<20}{row['bytes_up_per_site_round']:>20,.0f}"
            f"{row.get('bytes_up_reduction', float('nan')):>12.1f}×"
            f"{row['final_accuracy']:>11.4f}"
            f"{row.get('accuracy_change_points', float('nan')):>+10.2f}"
            f"{row['last3_accuracy']:>12.4f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
