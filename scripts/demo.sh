#!/usr/bin/env bash
# README command 1: install what is needed, then run the demo federation on the embedded
# default (ten sites on this machine; local Prefect, MLflow on sqlite, a local object store).
# Extra arguments go to `fedround run` (e.g. --json, --run-id ID to resume a run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/fedround run deployments/examples/mnist-demo.yaml "$@"
