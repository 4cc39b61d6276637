#!/usr/bin/env bash
# README command 2: install what the tests need, run the static checks, then the whole
# test suite. Tests that need servers (Prefect, MLflow, S3) start them on 127.0.0.1
# themselves and stop them again. Extra arguments go to pytest (e.g. -m "not slow", -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
scripts/install_postgres.sh   # Prefect on Postgres in the tests (tests/services.py)
scripts/install_chromium.sh   # the browser tests (tests/browser.py)
scripts/check.sh
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
fi
exit "$status"
