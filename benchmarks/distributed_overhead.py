"""Orchestration overhead per round: distributed (real Prefect server, one worker process
per site pool, S3) against the embedded default, with trivial local training.

Starts its own services on 127.0.0.1 (S3 with per-site identities, Prefect on Postgres
when installed, else sqlite), provisions N sites with a few dozen images each, deploys the
federation, starts one ``fedround site start`` worker per site, runs the federation with
``fedround run --distributed`` and then the same config embedded, and prints for each:

- per-round orchestration overhead = round wall time − the slowest site's training time
  (median, p90, max), the goal being <= 1.0 s at 10 site pools;
- dispatch latency = round opened → the site's training starts, over every site and
  round (median, p90, max);
- session start-up (trigger → every site's contract report) for the distributed run;
- how long the ten site workers took to register with the server after they were started
  (polled, not a fixed sleep: each worker does its imports once, before it registers).

    .venv/bin/python benchmarks/distributed_overhead.py [--sites 10] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = "bench-dist"


def wait_for_workers(api_url: str, config: Any, sites: list[str], timeout: float = 300) -> float:
    """Poll the Prefect server until every site's pool has a worker; the seconds it took."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.perf_counter()
    waiting = {config.work_pool(site) for site in sites}
    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        while waiting:
            waiting = {p for p in waiting if not client.read_workers_for_work_pool(p)}
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"no worker registered for pools {sorted(waiting)}")
            time.sleep(0.2)
    return time.perf_counter() - started


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
        "n": len(ordered),
    }


def run(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def latencies(store: Any, run_id: str, rounds: int, sites: list[str]) -> list[float]:
    from fedround.tasks.core import keys
    from fedround.tasks.core.manifest import UpdateManifest

    found = []
    for round_ in range(1, rounds + 1):
        for site in sites:
            key = keys.update_manifest_key(FEDERATION, run_id, round_, site)
            if store.exists(key):
                metrics = UpdateManifest.from_json(store.get(key)).metrics
                if "dispatch_latency_seconds" in metrics:
                    found.append(metrics["dispatch_latency_seconds"])
    return found


def summarise(result: dict[str, Any], lat: list[float]) -> dict[str, Any]:
    history = result["history"]
    return {
        "overhead_seconds": quantiles([h["orchestration_overhead_seconds"] for h in history]),
        "round_seconds": quantiles([h["round_seconds"] for h in history]),
        "slowest_site_train_seconds": quantiles([h["slowest_site_train_seconds"] for h in history]),
        "dispatch_latency_seconds": quantiles(lat) if lat else None,
        "setup_seconds": result["timings"]["setup_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--prefect-db", default="auto", choices=["auto", "sqlite", "postgres"])
    args = parser.parse_args()

    from fedround.flows.services.stack import ServiceStack
    from fedround.site_workers.demo_sites import provision_demo_sites
    from fedround.site_workers.signing_key import provision_site_keys
    from fedround.tasks.core.config import load_federation_config
    from fedround.tasks.object_store import LocalObjectStore, ObjectStoreSettings, S3ObjectStore
    from fedround.tasks.runtime import CoordinatorSettings

    scratch = Path(tempfile.mkdtemp(prefix="fedround-dist-bench-"))
    sites = [f"site-{i:02d}" for i in range(1, args.sites + 1)]
    config_path = scratch / "federation.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "federation": FEDERATION,
                "rounds": args.rounds,
                "data": {
                    "train_size": 40 * args.sites,
                    "test_size": 200,
                    "partition": {"kind": "iid"},
                },
                "selection": {"min_sites": args.sites, "deadline_s": 120, "liveness_s": 30},
                # orchestration only: no federated evaluation at the sites each round
                "evaluation": {"federated": {"every": 0, "final": False}},
                "contract": str(ROOT / "deployments/examples/contracts/mnist-site-data.json"),
                "sites": [{"name": s} for s in sites],
            }
        )
    )
    config = load_federation_config(config_path)
    stack = ServiceStack(scratch / "dist", ui=False, durable=False)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        endpoints = stack.start(
            services=("s3", "prefect"),
            prefect_db=args.prefect_db,
            federations={FEDERATION: sites},
        )
        print(f"services up in {time.perf_counter() - started:.1f}s ({endpoints.prefect_db})")
        base_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))
        }
        env = {**base_env, **endpoints.env(), "FEDROUND_STATE_DIR": str(scratch / "dist")}
        settings = CoordinatorSettings(
            state_dir=scratch / "dist",
            object_store=ObjectStoreSettings(kind="local", root=scratch / "unused"),
            tracking_uri=f"sqlite:///{scratch / 'dist' / 'mlflow.db'}",
            site_processes=1,
        )

        def site_store(site: str) -> ObjectStoreSettings:
            creds = endpoints.site_credentials(FEDERATION, site).object_store_settings()
            return ObjectStoreSettings.model_validate(creds)

        paths = provision_demo_sites(config, settings, site_store, endpoints.prefect_api_url)
        s3 = S3ObjectStore(
            endpoints.s3_endpoint,
            endpoints.s3_bucket,
            endpoints.admin_access_key,
            endpoints.admin_secret_key,
            region=endpoints.s3_region,
        )
        # updates must be signed: each site its key, its public key registered (as `fedround
        # site init` and an operator's `fedround keys register` do)
        provision_site_keys(paths, s3, FEDERATION)
        subprocess.run(
            [str(BIN / "fedround"), "deploy", str(config_path), "--project-dir", str(scratch)],
            env=env,
            check=True,
            capture_output=True,
        )
        for site in sites:
            workers.append(
                subprocess.Popen(
                    [str(BIN / "fedround"), "site", "start", "--config", str(paths[site])],
                    env={**base_env, **endpoints.site_env(FEDERATION, site)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        registered = wait_for_workers(endpoints.prefect_api_url, config, sites)
        print(
            f"{len(sites)} site workers registered in {registered:.1f}s; "
            f"running {args.rounds} distributed rounds"
        )
        distributed = run(
            [
                str(BIN / "fedround"),
                "run",
                str(config_path),
                "--distributed",
                "--json",
                "--run-id",
                "bench",
            ],
            env,
        )
        dist_lat = latencies(s3, "bench", args.rounds, sites)
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)
        stack.stop(purge=True)

    print("running the same federation embedded")
    embedded_state = scratch / "embedded"
    embedded = run(
        [str(BIN / "fedround"), "run", str(config_path), "--json", "--run-id", "bench"],
        {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
            "FEDROUND_STATE_DIR": str(embedded_state),
            "FEDROUND_LOCAL_SERVER": "0",  # a temporary server per run, gone with it
        },
    )
    emb_lat = latencies(LocalObjectStore(embedded_state / "objects"), "bench", args.rounds, sites)

    report = {
        "sites": args.sites,
        "rounds": args.rounds,
        "distributed": summarise(distributed, dist_lat),
        "embedded": summarise(embedded, emb_lat),
    }
    for mode in ("distributed", "embedded"):
        r = report[mode]
        o, d = r["overhead_seconds"], r["dispatch_latency_seconds"] or {}
        print(
            f"{mode:12s} overhead/round median {o['median']:.3f}s p90 {o['p90']:.3f}s "
            f"max {o['max']:.3f}s | dispatch latency median {d.get('median', float('nan')):.3f}s "
            f"p90 {d.get('p90', float('nan')):.3f}s max {d.get('max', float('nan')):.3f}s | "
            f"setup {r['setup_seconds']:.1f}s"
        )
    out = ROOT / "benchmarks/results"
    out.mkdir(exist_ok=True)
    (out / "distributed_overhead.json").write_text(json.dumps(report, indent=2))
    print(f"written to {out / 'distributed_overhead.json'}")


if __name__ == "__main__":
    main()
