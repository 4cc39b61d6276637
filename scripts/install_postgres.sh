#!/usr/bin/env bash
# Install Postgres' server binaries when missing (Debian/Ubuntu: apt's `postgresql`). The
# Prefect server in the tests runs on a private Postgres cluster that fedround starts and
# stops itself (flows/services/postgres.py); the package's own cluster is never started.
# `fedround up` works without Postgres (Prefect then falls back to sqlite).
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "Postgres is not installed and apt-get is not available: install the Postgres server" \
       "binaries (initdb, pg_ctl) with your package manager" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "fedround: installing Postgres (apt-get install postgresql)..." >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null
