#!/usr/bin/env bash
# Write random secrets for deployments/compose.yaml into deployments/secrets/ (mode 0600),
# leaving existing files alone. Sites: the arguments (default: site-01).
set -euo pipefail
cd "$(dirname "$0")/secrets"
umask 077
random() { head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c "$1"; }
put() { [ -s "$1" ] || printf '%s' "$2" > "$1"; }
put postgres_password "$(random 32)"
put mlflow_backend_store_uri "postgresql://fedround:$(cat postgres_password)@postgres:5432/mlflow"
put minio_root_user "fedround-root"
put minio_root_password "$(random 40)"
put coordinator_s3_access_key "coordinator-$(random 8)"
put coordinator_s3_secret_key "$(random 40)"
for site in "${@:-site-01}"; do
  put "site_${site}_s3_access_key" "${site}-$(random 8)"
  put "site_${site}_s3_secret_key" "$(random 40)"
done
echo "secrets in $PWD"
