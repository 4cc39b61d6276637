"""What naming your own model factory and training function costs per round, against
fedround's built-ins doing the same work.

The MNIST demo federation (deployments/examples/mnist-demo.yaml: ten sites, the CNN, one
local epoch of SGD) runs through ``fedround run`` twice over:

- **built-in**: ``model.factory: mnist_cnn`` and fedround's supervised loop;
- **user code**: a user package, pip-installed into the venv for the benchmark (and
  uninstalled after), whose factory builds the same CNN (its own code: same layers, same
  parameter names, same initialisation order) and whose ``train`` is the same SGD loop
  (same shuffling from ``context.seed``). Same seeds, so the final weights should be the
  same to the bit; the benchmark checks their digests.

Runs are interleaved (A B A B ...) because a shared machine's speed drifts; each variant
keeps its own state directory (its sites are provisioned on its first run). Reported: the
median round time of each variant over all its rounds but each run's first (which also
starts the site processes' imports), the median of the per-run medians, and their ratio
(goal ≤ 1.02). Because whole rounds on a busy machine are noisy, the same comparison is
also made in this process without orchestration: ``train_locally`` (what a site round
calls) on the largest site's shard, built-in loop vs the user's ``train`` through the
user-code boundary, interleaved ``--calls`` times each, wall and CPU time.
Prints a table and writes ``benchmarks/results/user_code_overhead.json``.

    .venv/bin/python benchmarks/user_code_overhead.py [--pairs 3] [--rounds 15]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml
from cli_run import run_cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "deployments" / "examples" / "mnist-demo.yaml"
RESULTS = ROOT / "benchmarks" / "results"
FEDROUND = Path(sys.executable).with_name("fedround")
DISTRIBUTION = "fr-bench-user-cnn"
MODULE = "fr_bench_user_cnn"

USER_CODE = '''
"""A user's own copy of the demo's CNN and of an SGD training loop."""

import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = 0.1307 * 255.0, 0.3081 * 255.0


class Net(nn.Module):
    def __init__(self, conv1, conv2, hidden):
        super().__init__()
        self.conv1 = nn.Conv2d(1, conv1, kernel_size=5)
        self.conv2 = nn.Conv2d(conv1, conv2, kernel_size=5)
        self.fc1 = nn.Linear(conv2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, pixels):
        x = (pixels.reshape(-1, 1, 28, 28) - MEAN) / STD
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def build(conv1=16, conv2=32, hidden=64):
    return Net(conv1, conv2, hidden)


def train(model, data, settings, context):
    generator = torch.Generator().manual_seed(context.seed)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    model.train()
    n = len(data.labels)
    total = 0.0
    for _ in range(settings.local_epochs):
        total = 0.0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.features[batch]), data.labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    return {"loss": total / max(n, 1)}
'''

PYPROJECT = f"""
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{DISTRIBUTION}"
version = "0.1.0"

[tool.setuptools]
py-modules = ["{MODULE}"]
"""


def pip(*args: str, cwd: Path | None = None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def write_configs(folder: Path, rounds: int) -> dict[str, Path]:
    """The demo's config twice: built-in factory and loop, and the user package's."""
    shutil.copytree(DEMO.parent / "contracts", folder / "contracts")
    base = yaml.safe_load(DEMO.read_text())
    base["rounds"] = rounds
    model = {k: v for k, v in base["model"].items() if k != "architecture"}
    builtin = {**base, "model": {**model, "factory": "mnist_cnn"}}
    user = {
        **base,
        "model": {**model, "factory": f"{MODULE}:build"},
        "training": {**base["training"], "train": f"{MODULE}:train"},
    }
    paths = {}
    for name, config in (("builtin", builtin), ("user", user)):
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def run(config: Path, state: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["FEDROUND_STATE_DIR"] = str(state)
    env["FEDROUND_LOCAL_SERVER"] = "0"  # a temporary server per run, gone with it
    result, seconds = run_cli([str(FEDROUND), "run", str(config), "--json"], env)
    return {**result, "wall_seconds": seconds}


def in_process(config_paths: dict[str, Path], state: Path, calls: int) -> dict[str, Any]:
    """``train_locally`` on the largest site's shard: built-in loop vs the user's train."""
    import torch

    from fedround.site_workers.data import load_dataset
    from fedround.site_workers.settings import load_site_settings
    from fedround.site_workers.training import train_locally
    from fedround.tasks.core.config import load_federation_config
    from fedround.tasks.core.models import build_model
    from fedround.tasks.core.usercode import RoundContext

    torch.set_num_threads(1)  # as in every site process
    importlib.invalidate_caches()  # the user package was installed after this process began
    configs = {name: load_federation_config(path) for name, path in config_paths.items()}
    sites = sorted((state / "federations" / configs["builtin"].federation / "sites").iterdir())
    data = {}
    for folder in sites:
        settings = load_site_settings(folder / "site.yaml")
        data[folder.name] = load_dataset(settings.train_path, configs["builtin"].data)
    site = max(data, key=lambda name: len(data[name]))
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in configs}
    weights: dict[str, str] = {}
    for call in range(calls):
        for name in ("builtin", "user") if call % 2 == 0 else ("user", "builtin"):
            config = configs[name]
            model = build_model(config.model, seed=config.seed)
            context = RoundContext(config.federation, "bench", site, 1, seed=call)
            wall, cpu = time.perf_counter(), time.process_time()
            result = train_locally(model, data[site], config.training, context)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
            if call == 0:
                weights[name] = hashlib.sha256(
                    b"".join(t.numpy().tobytes() for t in result.weights.values())
                ).hexdigest()
    medians = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    return {
        "site": site,
        "examples": len(data[site]),
        "calls": calls,
        "median_seconds": medians,
        "ratio_wall": medians["user"]["wall"] / medians["builtin"]["wall"],
        "ratio_cpu": medians["user"]["cpu"] / medians["builtin"]["cpu"],
        "same_weights": weights["user"] == weights["builtin"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="A B pairs of runs")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="in-process calls per variant")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"builtin": [], "user": []}
    with tempfile.TemporaryDirectory(prefix="fedround-usercode-") as tmp:
        folder = Path(tmp)
        package = folder / "package"
        package.mkdir()
        (package / f"{MODULE}.py").write_text(textwrap.dedent(USER_CODE))
        (package / "pyproject.toml").write_text(PYPROJECT)
        pip("install", "--no-deps", "--no-build-isolation", ".", cwd=package)
        try:
            configs = write_configs(folder, args.rounds)
            for pair in range(args.pairs):
                for name in ("builtin", "user") if pair % 2 == 0 else ("user", "builtin"):
                    result = run(configs[name], folder / f"state-{name}")
                    runs[name].append(result)
                    rounds = [h["round_seconds"] for h in result["history"]]
                    print(
                        f"pair {pair + 1} {name:<8} median round "
                        f"{statistics.median(rounds[1:]):.3f}s  accuracy "
                        f"{result['final_metrics']['accuracy']:.4f}",
                        flush=True,
                    )
            local = in_process(configs, folder / "state-builtin", args.calls)
        finally:
            pip("uninstall", "--yes", DISTRIBUTION)
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        rounds = [h["round_seconds"] for r in results for h in r["history"][1:]]
        per_run = [
            statistics.median([h["round_seconds"] for h in r["history"][1:]]) for r in results
        ]
        summary[name] = {
            "median_round_seconds": statistics.median(rounds),
            "median_of_run_medians": statistics.median(per_run),
            "run_medians": per_run,
            "accuracy": [r["final_metrics"]["accuracy"] for r in results],
            "weights_sha256": sorted({r["checkpoint"]["weights_sha256"] for r in results}),
            "wall_seconds": [r["wall_seconds"] for r in results],
        }
    ratio = summary["user"]["median_round_seconds"] / summary["builtin"]["median_round_seconds"]
    same = summary["user"]["weights_sha256"] == summary["builtin"]["weights_sha256"]
    report = {
        "config": str(DEMO.relative_to(ROOT)),
        "rounds": args.rounds,
        "pairs": args.pairs,
        "order": "interleaved A B, B A, ...",
        "variants": summary,
        "ratio_user_over_builtin": ratio,
        "goal_ratio_at_most": 1.02,
        "same_final_weights": same,
        "in_process_train_locally": local,
    }
    print()
    print(f"{'variant':<10} {'median round':>13} {'median of runs':>15} {'accuracy':>9}")
    for name, row in summary.items():
        print(
            f"{name:<10} {row['median_round_seconds']:>12.3f}s "
            f"{row['median_of_run_medians']:>14.3f}s {statistics.median(row['accuracy']):>9.4f}"
        )
    print(f"ratio user/built-in {ratio:.3f} (goal <= 1.02); same final weights: {same}")
    builtin, user = local["median_seconds"]["builtin"], local["median_seconds"]["user"]
    print(
        f"in process, train_locally on {local['site']} ({local['examples']} examples), "
        f"median of {local['calls']}: built-in {builtin['wall']:.4f}s wall {builtin['cpu']:.4f}s "
        f"cpu, user {user['wall']:.4f}s wall {user['cpu']:.4f}s cpu; ratio wall "
        f"{local['ratio_wall']:.3f}, cpu {local['ratio_cpu']:.3f}; same weights "
        f"{local['same_weights']}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "user_code_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
