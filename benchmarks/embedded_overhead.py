"""What the embedded default costs over a plain torch loop doing the same federated work.

Runs the demo federation (deployments/examples/mnist-demo.yaml unless told otherwise)
through fedround and through ``plain_fedavg.py`` (same data, seeds, model, training,
FedAvg, evaluation) and prints:

- median round time of each, measured in this one benchmark process (fedround through the
  same function ``fedround run`` calls, then the plain loop), and their ratio;
- whole-command wall time of ``fedround run`` (cold: fresh state dir, so Prefect's and
  MLflow's databases are created; warm: the state dir reused) and of the plain loop
  script, as separate processes, medians over ``--repeats``;
- peak memory: the largest single process and the whole process tree (sampled every
  0.1 s with psutil), for both commands;
- final accuracy of each.

    .venv/bin/python benchmarks/embedded_overhead.py [--repeats 3] [--config FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "deployments/examples/mnist-demo.yaml"
BIN = Path(sys.executable).parent


def measure(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a command to completion, sampling the RSS of its whole process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    root = psutil.Process(process.pid)
    peak_tree = peak_single = 0
    while process.poll() is None:
        try:
            members = [root, *root.children(recursive=True)]
            sizes = []
            for member in members:
                with contextlib.suppress(psutil.Error):
                    sizes.append(member.memory_info().rss)
            peak_tree = max(peak_tree, sum(sizes))
            peak_single = max(peak_single, max(sizes, default=0))
        except psutil.Error:
            pass
        time.sleep(0.1)
    stdout = process.stdout.read() if process.stdout else ""
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited with {process.returncode}")
    return {
        "seconds": seconds,
        "peak_tree_mib": peak_tree / 2**20,
        "peak_process_mib": peak_single / 2**20,
        "result": json.loads(stdout.strip().splitlines()[-1]),
    }


def local_servers_mib(state: Path) -> float:
    """RSS of the local Prefect and MLflow servers (and their children) under ``state``."""
    from fedround.flows.services.local_ui import LocalServers
    from fedround.flows.services.proc import read_record

    servers = LocalServers(state)
    total = 0
    for name in servers.running():
        record = read_record(servers.run_dir, name)
        process = record.process() if record else None
        if process is None:
            continue
        for member in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += member.memory_info().rss
    return total / 2**20


def in_process_rounds(config_path: Path, state: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """fedround (as `fedround run` runs it) then the plain loop, in this one process."""
    from fedround.flows import environment

    environment.configure(state)
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "ERROR")
    from fedround.flows.cli.main import _run_embedded

    fed = _run_embedded(config_path, None, None)
    sys.path.insert(0, str(Path(__file__).parent))
    from plain_fedavg import run_plain

    from fedround.tasks.core.config import load_federation_config

    plain = run_plain(load_federation_config(config_path))
    return fed, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    scratch = Path(tempfile.mkdtemp(prefix="fedround-bench-"))

    print(f"benchmark: {args.config} (cores: {os.cpu_count()})", flush=True)
    fed, plain = in_process_rounds(args.config.resolve(), scratch / "in-process")
    fed_rounds = [h["round_seconds"] for h in fed["history"]]
    ratio = statistics.median(fed_rounds) / plain["round_median_seconds"]

    cold, warm, temporary, baseline, servers_mib = [], [], [], [], []
    for i in range(args.repeats):
        state = scratch / f"cmd-{i}"
        command = [
            str(BIN / "fedround"),
            "run",
            str(args.config),
            "--json",
            "--state-dir",
            str(state),
        ]
        # cold: a fresh state dir, the local servers start; warm: they are up already
        cold.append(measure(command, env | {"FEDROUND_LOCAL_SERVER": "1"}))
        warm.append(measure(command, env | {"FEDROUND_LOCAL_SERVER": "1"}))
        servers_mib.append(local_servers_mib(state))
        subprocess.run([str(BIN / "fedround"), "down", "--state-dir", str(state)], env=env)
        # the previous default: a temporary Prefect server per command (state dir reused)
        temporary.append(measure(command, env | {"FEDROUND_LOCAL_SERVER": "0"}))
        baseline.append(
            measure(
                [
                    sys.executable,
                    str(Path(__file__).with_name("plain_fedavg.py")),
                    str(args.config),
                    "--json",
                ],
                env,
            )
        )
        print(f"  repeat {i + 1}/{args.repeats} done", flush=True)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    report = {
        "round_median_seconds": {
            "fedround": statistics.median(fed_rounds),
            "plain": plain["round_median_seconds"],
            "ratio": ratio,
        },
        "command_seconds": {
            "fedround_cold": med(cold, "seconds"),
            "fedround_warm": med(warm, "seconds"),
            "plain": med(baseline, "seconds"),
            "fedround_temporary_server": med(temporary, "seconds"),
            "ratio_cold": med(cold, "seconds") / med(baseline, "seconds"),
            "ratio_warm": med(warm, "seconds") / med(baseline, "seconds"),
            "ratio_temporary_server": med(temporary, "seconds") / med(baseline, "seconds"),
        },
        "peak_memory_mib": {
            # the command's own tree (warm: the long-lived servers are not its children)
            "fedround_largest_process": max(r["peak_process_mib"] for r in warm + temporary),
            "fedround_process_tree": max(r["peak_tree_mib"] for r in warm + temporary),
            "fedround_cold_tree_with_servers": max(r["peak_tree_mib"] for r in cold),
            "local_servers_after_warm": statistics.median(servers_mib),
            "plain": max(r["peak_tree_mib"] for r in baseline),
        },
        "final_accuracy": {
            "fedround": fed["final_metrics"]["accuracy"],
            "plain": plain["final_accuracy"],
        },
        "fedround_warm_breakdown_seconds": {
            "outside_the_flow": statistics.median(
                r["seconds"] - r["result"]["timings"]["flow_seconds"] for r in warm
            ),
            "flow_setup": statistics.median(r["result"]["timings"]["setup_seconds"] for r in warm),
            "rounds": statistics.median(r["result"]["timings"]["rounds_seconds"] for r in warm),
            "after_the_rounds": statistics.median(
                r["result"]["timings"]["flow_seconds"]
                - r["result"]["timings"]["setup_seconds"]
                - r["result"]["timings"]["rounds_seconds"]
                for r in warm
            ),
        },
        "repeats": args.repeats,
    }
    r, c, m = report["round_median_seconds"], report["command_seconds"], report["peak_memory_mib"]
    print(
        f"\nround time (median)   fedround {r['fedround']:.3f}s   plain {r['plain']:.3f}s   "
        f"ratio {r['ratio']:.2f} (goal <= 1.10)\n"
        f"whole command         fedround {c['fedround_cold']:.1f}s cold / "
        f"{c['fedround_warm']:.1f}s warm (local servers up) / "
        f"{c['fedround_temporary_server']:.1f}s with a temporary server   plain {c['plain']:.1f}s"
        f"   ratio {c['ratio_cold']:.2f} / {c['ratio_warm']:.2f} (goal <= 1.5) / "
        f"{c['ratio_temporary_server']:.2f}\n"
        f"peak memory           fedround largest process {m['fedround_largest_process']:.0f} MiB, "
        f"whole tree {m['fedround_process_tree']:.0f} MiB   plain {m['plain']:.0f} MiB "
        f"(goal <= 1200); local Prefect + MLflow servers {m['local_servers_after_warm']:.0f} MiB\n"
        f"final accuracy        fedround {report['final_accuracy']['fedround']:.4f}   "
        f"plain {report['final_accuracy']['plain']:.4f}"
    )
    b = report["fedround_warm_breakdown_seconds"]
    print(
        f"fedround warm, where the time goes: {b['outside_the_flow']:.1f}s outside the flow "
        f"(imports, connecting to the local servers), {b['flow_setup']:.1f}s flow "
        f"set-up (MLflow run, checkpoint 0, data contracts), {b['rounds']:.1f}s rounds, "
        f"{b['after_the_rounds']:.1f}s after them (model logging and registration, plots)"
    )
    out = ROOT / "benchmarks/results"
    out.mkdir(exist_ok=True)
    (out / "embedded_overhead.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out / 'embedded_overhead.json'}")


if __name__ == "__main__":
    main()
