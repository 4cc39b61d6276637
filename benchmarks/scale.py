"""Many simulated sites on one machine: what each sampled site costs the framework per round,
and whether the coordinator's memory grows with the number of sites.

For each size (10, 100 and 1,000 sites by default) the benchmark writes a federation of
virtual sites, each with its own shard (40 examples of a linearly separable 8-feature
problem), its own ``site.yaml`` and its own persisted site state, and runs it with the
real ``fedround run`` (the embedded default: a few site hosts serve all the sites,
as a simulation would): a logistic-regression model, 10 % of the sites sampled per round.

Reported per size (medians over the rounds after the first):

- round time, total training time of the round's sites, sampled sites;
- framework cost per sampled site per round = (round time − training time ÷ worker
  processes) ÷ sampled sites: what the runtime spends per site beyond the training itself;
- peak memory (RSS) of the coordinator process and of the whole process tree, sampled
  every 0.1 s; the coordinator's at 1,000 sites against its own at 10.

    .venv/bin/python benchmarks/scale.py [--sizes 10 100 1000] [--rounds 5] [--processes 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedround.site_workers.data import save_site_data

ROOT = Path(__file__).resolve().parents[1]
FEDROUND = str(Path(sys.executable).with_name("fedround"))
FEATURES = 8
CONTRACT = {
    "name": "scale-arrays",
    "expectations": [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": [0, 1]},
        },
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "n_features", "min_value": FEATURES, "max_value": FEATURES},
        },
    ],
}


def _arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x @ np.linspace(-1.0, 1.0, FEATURES) > 0).astype(np.int64)
    return x, y


def write_federation(root: Path, sites: int, rounds: int) -> Path:
    """``sites`` virtual sites with their own shards and site.yaml, and the config."""
    names = [f"site-{i:04d}" for i in range(sites)]
    for index, site in enumerate(names):
        folder = root / "sites" / site
        save_site_data(folder / "train.npz", *_arrays(40, seed=index))
        save_site_data(folder / "test.npz", *_arrays(10, seed=10_000 + index))
        settings = {
            "site": site,
            "federation": "scale",
            "data_dir": ".",
            "object_store": {"kind": "local", "root": str(root / "state" / "objects")},
        }
        (folder / "site.yaml").write_text(json.dumps(settings))
    fed = root / "fed"
    fed.mkdir()
    save_site_data(fed / "holdout.npz", *_arrays(500, seed=999))
    (fed / "contract.json").write_text(json.dumps(CONTRACT))
    listed = "\n".join(f"  - {{name: {s}, config: ../sites/{s}/site.yaml}}" for s in names)
    (fed / "federation.yaml").write_text(
        f"""federation: scale
tenant: bench
seed: 1
rounds: {rounds}
data: {{kind: arrays, source: sites}}
model: {{factory: logistic_regression, in_features: {FEATURES}, out_features: 2}}
training: {{local_epochs: 1, batch_size: 16, learning_rate: 0.1}}
evaluation: {{holdout: holdout.npz, federated: {{final: false}}}}
selection: {{fraction: 0.1, min_sites: 1, deadline_s: 600, join_timeout_s: 3600}}
contract: contract.json
sites:
{listed}
"""
    )
    return fed / "federation.yaml"


class MemorySampler(threading.Thread):
    """Peak RSS of one process and of its whole tree, every 0.1 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_root = self.peak_tree = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(psutil.Error):
                own = self.root.memory_info().rss
                tree = own
                for child in self.root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        tree += child.memory_info().rss
                self.peak_root = max(self.peak_root, own)
                self.peak_tree = max(self.peak_tree, tree)
            time.sleep(0.1)


def run_size(sites: int, rounds: int, processes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"fedround-scale-{sites}-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        config = write_federation(root, sites, rounds)
        written = time.perf_counter() - started
        env = {
            **os.environ,
            "FEDROUND_STATE_DIR": str(root / "state"),
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "ERROR",
            # a temporary server per run: the long-lived local one would outlive the
            # temporary folder (and be measured as part of the coordinator's tree)
            "FEDROUND_LOCAL_SERVER": "0",
        }
        argv = [FEDROUND, "run", str(config), "--json", "--processes", str(processes)]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            begun = time.perf_counter()
            process = subprocess.Popen(
                argv, env=env, stdout=out, stderr=err, text=True, start_new_session=True
            )
            sampler = MemorySampler(process.pid)
            sampler.start()
            try:
                code = process.wait()
            finally:
                sampler.stopped.set()
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)
            seconds = time.perf_counter() - begun
            out.seek(0)
            err.seek(0)
            if code != 0:
                raise RuntimeError(f"{sites} sites: exited with {code}:\n{err.read()[-3000:]}")
            result = json.loads(out.read().strip().splitlines()[-1])
    history = [h for h in result["history"] if "round_seconds" in h][1:]  # first: warm-up
    costs = [
        (h["round_seconds"] - h["train_seconds_total"] / processes) / h["sites_accepted"]
        for h in history
    ]
    return {
        "sites": sites,
        "sampled_per_round": statistics.median(h["sites_selected"] for h in history),
        "round_seconds": statistics.median(h["round_seconds"] for h in history),
        "train_seconds_per_round": statistics.median(h["train_seconds_total"] for h in history),
        "framework_ms_per_sampled_site": 1000 * statistics.median(costs),
        "setup_seconds": result["timings"]["setup_seconds"],
        "command_seconds": seconds,
        "write_seconds": written,
        "coordinator_peak_mib": sampler.peak_root / 2**20,
        "tree_peak_mib": sampler.peak_tree / 2**20,
        "accuracy": result["final_metrics"].get("accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    args = parser.parse_args()
    rows = []
    for sites in args.sizes:
        row = run_size(sites, args.rounds, args.processes)
        rows.append(row)
        print(json.dumps(row), flush=True)
    smallest = rows[0]["coordinator_peak_mib"]
    for row in rows:
        row["coordinator_memory_vs_smallest"] = row["coordinator_peak_mib"] / smallest
    print(
        f"{'sites':>6} {'sampled':>7} {'round s':>8} {'train s':>8} {'ms/site':>8} "
        f"{'coord MiB':>9} {'×':>5} {'tree MiB':>8} {'setup s':>8}"
    )
    for r in rows:
        print(
            f"{r['sites']:>6} {r['sampled_per_round']:>7.0f} {r['round_seconds']:>8.3f} "
            f"{r['train_seconds_per_round']:>8.3f} {r['framework_ms_per_sampled_site']:>8.1f} "
            f"{r['coordinator_peak_mib']:>9.0f} {r['coordinator_memory_vs_smallest']:>5.2f} "
            f"{r['tree_peak_mib']:>8.0f} {r['setup_seconds']:>8.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
