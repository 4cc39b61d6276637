#!/usr/bin/env bash
# The "bring your own federation" example on real data, one command: the RAND Health
# Insurance Experiment (the table statsmodels ships), one site per insurance plan, with the
# model, training and evaluation of the example's own package.
#   1. install fedround (.venv), then the example package with pip, as a user would;
#   2. write every plan's files and site.yaml and the coordinator's held-out sample;
#   3. run the federation on the embedded default (local Prefect, MLflow, object store).
# Extra arguments go to `fedround run` (e.g. --json, --run-id ID to resume a run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
example=deployments/examples/randhie
state="${FEDROUND_STATE_DIR:-.fedround}"
.venv/bin/python -m pip --disable-pip-version-check install --quiet --no-build-isolation -c requirements.lock \
  "./$example" 2> >(grep -v "^WARNING: Location 'file:" >&2)
.venv/bin/randhie-prepare "$example" --state-dir "$state" >&2
FEDROUND_STATE_DIR="$state" exec .venv/bin/fedround run "$example/federation.yaml" "$@"
