#!/usr/bin/env bash
# Install Postgres' server binaries when missing (Debian/Ubuntu: apt's `postgresql`). The
# Prefect server in the tests runs on a private Postgres cluster that fedround starts and
# stops itself (flows/services/postgres.py); the package's own cluster is never started.
# `fedround up` works without Postgres (Prefect then falls back to sqlite).
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
  exit 0
fi
exec "$(dirname "$0")/apt_install.sh" Postgres "the Postgres server binaries (initdb, pg_ctl)" postgresql
