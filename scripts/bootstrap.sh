#!/usr/bin/env bash
# Create .venv with Python 3.11 and install fedround into it: torch first and on its own
# (the CPU build), then every other dependency pinned by requirements.lock.
#   scripts/bootstrap.sh          runtime only
#   scripts/bootstrap.sh test     runtime + test tools (pytest, ruff, mypy, S3 server, ...)
# Re-running is a no-op while pyproject.toml and requirements.lock are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin="$candidate"; break
    fi
  done
fi
if [ -z "$python_bin" ]; then
  echo "fedround needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

fingerprint="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
stamp=".venv/.installed-${fingerprint}${extras:+-$extras}"
if [ -f "$stamp" ]; then
  exit 0
fi

quiet_pip() {
  # This machine's pip config names local package folders that may be absent; keep that noise out.
  .venv/bin/python -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}

echo "fedround: setting up .venv (one time, a few minutes)..." >&2
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
quiet_pip install --quiet torch==2.13.0
target="."
[ -n "$extras" ] && target=".[${extras}]"
quiet_pip install --quiet -c requirements.lock -e "$target"
if [[ ",$extras," == *,test,* || ",$extras," == *,flower,* ]]; then
  # flwr's metadata caps fastapi, typer, protobuf, ... below what prefect and fedround pin
  # (for its own server and CLI); its client API needs none of that: see pyproject.toml.
  quiet_pip install --quiet --no-deps -c requirements.lock flwr
fi
rm -f .venv/.installed-*
touch "$stamp"
echo "fedround: .venv ready" >&2
