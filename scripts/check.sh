#!/usr/bin/env bash
# Static checks: ruff (lint + format), mypy (strict on the pure core and the MLflow plugins)
# and the import-linter contracts (the core is pure; flows > site_workers > tasks layers).
set -euo pipefail
cd "$(dirname "$0")/.."
# mypy and import-linter resolve modules on the file system, not through the editable
# install's import hook, so give them a view of the tree under the installed name `fedround`.
view="build/src-view"
rm -rf "$view" && mkdir -p "$view/fedround"
for package in api flows tasks site_workers mlflow_plugins; do
  ln -s "$PWD/$package" "$view/fedround/$package"
done
.venv/bin/ruff check .
.venv/bin/ruff format --check .
MYPYPATH="$view" .venv/bin/mypy --cache-dir build/mypy-cache \
  -p fedround.api -p fedround.tasks -p fedround.flows -p fedround.site_workers -p fedround.mlflow_plugins
PYTHONPATH="$view" .venv/bin/lint-imports --no-cache
